"""The NIC admin API: one module per command, each holding how its request is built,
how the NIC answers it, and how the answer reads back as plain data for twinctl.

Every command module has:

- ``NAME``: the union member in ``AdminRequest``/``AdminResponse``;
- ``build(request, arg)``: fill the request builder (client side);
- ``handle(nic, request, response)``: answer from the NIC (server side); a command
  that waits on the network has ``parse(request)`` and ``handle_async(nic, *args,
  response)`` instead;
- ``read(response)``: the answer as JSON-ready data (client side).
"""

from types import ModuleType

from twinmesh.nic.admin import add_peer, peers, ping, remove_peer, route, routes, self_info

COMMANDS: dict[str, ModuleType] = {
    module.NAME: module
    for module in (self_info, peers, add_peer, remove_peer, routes, route, ping)
}

"""The NIC admin API: one module per command, each holding how its request is built,
how the NIC answers it, and how the answer reads back as plain data for twinctl.

Every command module has:

- ``NAME``: the union member in ``AdminRequest``/``AdminResponse``;
- ``build(request, arg)``: fill the request builder (client side);
- ``handle(nic, request, response)``: answer from the NIC (server side);
- ``read(response)``: the answer as JSON-ready data (client side).
"""

from types import ModuleType

from twinmesh.nic.admin import add_peer, peers, remove_peer, self_info

COMMANDS: dict[str, ModuleType] = {
    module.NAME: module for module in (self_info, peers, add_peer, remove_peer)
}

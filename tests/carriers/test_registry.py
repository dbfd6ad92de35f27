from twinmesh.carriers.registry import default_carriers
from twinmesh.carriers.tcp import TcpCarrier
from twinmesh.carriers.ws import WebSocketCarrier


def test_default_carriers_by_scheme() -> None:
    carriers = default_carriers()
    assert set(carriers) == {"tcp", "ws"}
    assert isinstance(carriers["tcp"], TcpCarrier)
    assert isinstance(carriers["ws"], WebSocketCarrier)
    assert all(scheme == carrier.scheme for scheme, carrier in carriers.items())


def test_each_call_gives_fresh_carriers() -> None:
    assert default_carriers()["tcp"] is not default_carriers()["tcp"]

"""The algorithm interface's typed records: no string-keyed state in the methods, and what crosses a process
boundary (exchange files read with ``weights_only=True``) or goes into a checkpoint comes back as it went."""

import ast
import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fedmef_core.algorithms.fedmef import FedMefPayload, FedMefState, FedMefUpload
from fedmef_core.algorithms.fedtiny import Candidates, CandidateScores
from fedmef_core.algorithms.records import ClientResult, ServerState
from fedmef_core.checkpoint import load_exchange, save_exchange
from fedmef_core.client import Broadcast, run_client
from fedmef_core.executors import local_executor
from fedmef_core.wire import Record
from tests.conftest import server_of, tiny_with
from tests.core.conftest import SMALL_DATA

ALGORITHMS = Path(__file__).resolve().parents[2] / "fedmef_core" / "algorithms"


def string_subscripts(source: str, filename: str = "<source>") -> list[str]:
    """Every ``x["name"]`` in `source`: where a dict keyed by names stands in for a typed record."""
    return [f"{filename}:{node.lineno}: {ast.unparse(node)}" for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, str)]


def test_the_methods_keep_no_string_keyed_state():
    assert sorted(string_subscripts('state["masks"][name] = sums["scores"][name]')) == [
        "<source>:1: state['masks']", "<source>:1: sums['scores']"]  # what the scan finds; layer names are data
    found = [hit for path in sorted(ALGORITHMS.glob("*.py")) for hit in string_subscripts(path.read_text(), path.name)]
    assert found == []


def _roundtrip(record: Record, tmp_path: Path) -> dict:
    """`record`'s wire dict, as a worker reads it from an exchange file (torch.load with weights_only=True)."""
    return load_exchange(save_exchange(tmp_path / "exchange.pt", record.to_wire()))


def _assert_same(a, b):
    if isinstance(a, Record):
        assert type(a) is type(b)
        _assert_same(a.to_wire(), b.to_wire())
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


def test_a_fedmef_adjustment_round_through_exchange_files_equals_the_round_in_memory(data, tmp_path):
    config = tiny_with(data=SMALL_DATA, federation={"rounds": 2, "clients_per_round": 2}, sap={"enabled": False},
                       pruning={"method": "fedmef", "density": 0.2, "adjust_interval": 1, "adjust_until": 4})
    server = server_of(config, data)
    broadcast = server.broadcast(1)
    assert isinstance(broadcast.payload, FedMefPayload) and broadcast.payload.adjust and broadcast.payload.low
    received = Broadcast.from_dict(_roundtrip(broadcast, tmp_path))
    _assert_same(broadcast, received)

    train, _, parts = data
    clients = server.sample_clients(1)
    in_memory = local_executor(server)(broadcast, clients)
    over_the_wire = []
    for c in clients:
        result = run_client(config, received, c, train, parts[c], server.device)
        over_the_wire.append(ClientResult.from_dict(_roundtrip(result, tmp_path)))
    for a, b in zip(in_memory, over_the_wire):
        assert isinstance(b.upload, FedMefUpload)
        _assert_same(a, b)

    direct = copy.deepcopy(server)
    metrics = server.finish_round(1, over_the_wire, 0.0)
    assert {k: v for k, v in metrics.items() if k != "round_seconds"} == {
        k: v for k, v in direct.finish_round(1, in_memory, 0.0).items() if k != "round_seconds"}


def test_the_setup_exchange_and_the_server_state_travel_as_plain_dicts(tmp_path):
    masks = {"w": torch.tensor([True, False])}
    setup = Broadcast(round=0, lr=0.0, state={"w": torch.ones(2)}, setup=Candidates(candidates=[masks, masks]))
    _assert_same(setup, Broadcast.from_dict(_roundtrip(setup, tmp_path)))
    answer = ClientResult(client_id=3, num_samples=7, state={}, train_loss=0.0, steps=0,
                          upload=CandidateScores(loss=torch.ones(2, dtype=torch.float64), buffers=[{}, {}]))
    _assert_same(answer, ClientResult.from_dict(_roundtrip(answer, tmp_path)))

    state = ServerState(masks=masks)
    assert state.to_wire() == {"masks": masks}  # a checkpoint's server_state, keyed as before the records
    assert ServerState().to_wire() == {}  # dense FedAvg's
    _assert_same(state, ServerState.from_wire(_roundtrip(state, tmp_path)))
    marked = {"w": torch.tensor([0])}  # FedMef's, kept from a broadcast to its aggregation
    assert FedMefState.from_wire({"masks": masks, "marked": marked}) == FedMefState(masks=masks, marked=marked)


def test_a_record_of_a_class_the_reader_does_not_know_is_one_clear_error():
    @dataclass
    class Local(Record):
        x: int

    wire = Broadcast(round=1, lr=0.1, state={}, setup=Local(x=1)).to_wire()
    wire["setup"]["__record__"] = "somewhere.Else"
    with pytest.raises(ValueError, match="unknown record class 'somewhere.Else': import the module"):
        Broadcast.from_dict(wire)


@dataclass
class Part(Record):
    x: torch.Tensor


@dataclass
class Parts(Record):
    """A method's upload whose records sit in a list and a dict (e.g. one per candidate, per layer)."""

    each: list[Part]
    by_layer: dict[str, Part]


def test_records_inside_a_list_or_a_dict_travel_through_exchange_files(tmp_path):
    upload = Parts(each=[Part(torch.ones(2)), Part(torch.zeros(1))], by_layer={"conv.weight": Part(torch.ones(3))})
    result = ClientResult(client_id=0, num_samples=1, state={}, train_loss=0.0, steps=1, upload=upload)
    _assert_same(result, ClientResult.from_dict(_roundtrip(result, tmp_path)))


@dataclass
class Optional_(Record):
    """A method's record whose None means something: a required field, and one whose default is not None."""

    note: dict | None
    scale: float | None = 1.0
    extra: int | None = None


def test_a_none_comes_back_as_none_whatever_the_fields_default(tmp_path):
    for record in (Optional_(note=None, scale=None), Optional_(note={"a": 1}, scale=None, extra=2)):
        _assert_same(record, Optional_.from_wire(_roundtrip(record, tmp_path)))
    assert Optional_(note={}).to_wire() == {"note": {}, "scale": 1.0}  # None where None is the default: left out


@dataclass
class _Counts(Record):
    seen: int


class _Undecorated(_Counts):  # a new field without @dataclass: the wire would silently drop it
    extra: int = 5


def test_a_record_subclass_without_its_own_dataclass_is_refused_not_silently_truncated():
    assert _Counts(3).to_wire() == {"seen": 3}
    with pytest.raises(TypeError, match="_Undecorated is a Record but not a @dataclass"):
        _Undecorated(3).to_wire()

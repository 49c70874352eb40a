"""Every GPU request shape a Slurm 22.05 job_desc carries, one row each."""

from __future__ import annotations

import pytest

from policies.gpu import GpuRequest, GpuRequestError, parse_array, parse_gpu_request
from policies.request import JobRequest


class _RequestWithSockets(JobRequest):
    """A job_desc that carries sockets_per_node (JobRequest does not have the field yet)."""

    sockets_per_node: int | None = None


# id, JobRequest fields, shards_per_gpu, expected (gpu_type, per_node, nodes, total, parts)
GPU_SHAPES = [
    ("no-gpus", {}, 8, (None, 0.0, 1, 0.0, ())),
    ("cpu-only-tres", {"tres_per_task": "cpu:4"}, 8, (None, 0.0, 1, 0.0, ())),
    ("gres-untyped", {"tres_per_node": "gres:gpu:2"}, 8, (None, 2.0, 1, 2.0, ((None, 2.0),))),
    ("gres-typed", {"tres_per_node": "gres:gpu:a100:2"}, 8,
     ("a100", 2.0, 1, 2.0, (("a100", 2.0),))),
    ("gres-slash-typed", {"tres_per_node": "gres/gpu:a100:2"}, 8,
     ("a100", 2.0, 1, 2.0, (("a100", 2.0),))),
    ("tres-equals-untyped", {"tres_per_node": "gres/gpu=2"}, 8,
     (None, 2.0, 1, 2.0, ((None, 2.0),))),
    ("tres-equals-typed", {"tres_per_node": "gres/gpu:h100=3"}, 8,
     ("h100", 3.0, 1, 3.0, (("h100", 3.0),))),
    ("gres-no-count-means-1", {"tres_per_node": "gres:gpu"}, 8,
     (None, 1.0, 1, 1.0, ((None, 1.0),))),
    ("gres-type-no-count", {"tres_per_node": "gres:gpu:a100"}, 8,
     ("a100", 1.0, 1, 1.0, (("a100", 1.0),))),
    ("legacy-gres-field", {"tres_per_node": "gpu:2"}, 8, (None, 2.0, 1, 2.0, ((None, 2.0),))),
    ("mig-type-name", {"tres_per_node": "gres:gpu:a100_3g.20gb:2"}, 8,
     ("a100_3g.20gb", 2.0, 1, 2.0, (("a100_3g.20gb", 2.0),))),
    ("gpu-count-0", {"tres_per_node": "gres:gpu:0"}, 8, (None, 0.0, 1, 0.0, ())),
    ("trailing-comma-and-spaces", {"tres_per_node": " gres:gpu:2 , "}, 8,
     (None, 2.0, 1, 2.0, ((None, 2.0),))),
    # --gpus=N is the total across the job, spread over its nodes
    ("gpus-per-job", {"tres_per_job": "gres:gpu:4", "min_nodes": 2}, 8,
     (None, 2.0, 2, 4.0, ((None, 4.0),))),
    ("gpus-per-job-typed", {"tres_per_job": "gres:gpu:a100:4"}, 8,
     ("a100", 4.0, 1, 4.0, (("a100", 4.0),))),
    ("gpus-per-node-3-nodes", {"tres_per_node": "gres:gpu:2", "min_nodes": 3, "max_nodes": 3},
     8, (None, 2.0, 3, 6.0, ((None, 6.0),))),
    # -N 2 --gres=gpu:4 = 8
    ("multi-node-gres", {"tres_per_node": "gres:gpu:4", "min_nodes": 2}, 8,
     (None, 4.0, 2, 8.0, ((None, 8.0),))),
    # -N 2-4 prices the most nodes Slurm may give: 4 x 1
    ("node-range-prices-max", {"tres_per_node": "gres:gpu:1", "min_nodes": 2, "max_nodes": 4},
     8, (None, 1.0, 4, 4.0, ((None, 4.0),))),
    # -n 8 --gpus-per-task=1 = 8
    ("gpus-per-task", {"tres_per_task": "gres:gpu:1", "num_tasks": 8}, 8,
     (None, 8.0, 1, 8.0, ((None, 8.0),))),
    # -N 2 --ntasks-per-node=4 --gpus-per-task=a100:2 = 2 x 4 x 2
    ("gpus-per-task-per-node", {"tres_per_task": "gres:gpu:a100:2", "ntasks_per_node": 4,
                                "min_nodes": 2}, 8, ("a100", 8.0, 2, 16.0, (("a100", 16.0),))),
    # no -n: one task per node
    ("gpus-per-task-default-tasks", {"tres_per_task": "gres:gpu:1", "min_nodes": 3}, 8,
     (None, 1.0, 3, 3.0, ((None, 3.0),))),
    # tres_per_task also carries cpu entries; only the GPUs count
    ("gpus-per-task-with-cpu", {"tres_per_task": "cpu:4,gres:gpu:1", "num_tasks": 2}, 8,
     (None, 2.0, 1, 2.0, ((None, 2.0),))),
    # no sockets_per_node in the request: 1 socket per node, so -N 2 --gpus-per-socket=2 = 4
    ("gpus-per-socket-assume-1", {"tres_per_socket": "gres:gpu:2", "min_nodes": 2}, 8,
     (None, 2.0, 2, 4.0, ((None, 4.0),))),
    ("mixed-types", {"tres_per_node": "gres:gpu:a100:2,gres:gpu:h100:1"}, 8,
     (None, 3.0, 1, 3.0, (("a100", 2.0), ("h100", 1.0)))),
    ("typed-and-untyped", {"tres_per_node": "gres:gpu:2,gres:gpu:a100:1"}, 8,
     (None, 3.0, 1, 3.0, ((None, 2.0), ("a100", 1.0)))),
    ("other-gres-ignored", {"tres_per_node": "gres:nic:1,gres:gpu:a100:2,gres:mps:100"}, 8,
     ("a100", 2.0, 1, 2.0, (("a100", 2.0),))),
    ("licenses-ignored", {"tres_per_job": "license/matlab=1,gres/gpu:a100=2"}, 8,
     ("a100", 2.0, 1, 2.0, (("a100", 2.0),))),
    # gres/shard: 4 of 8 shards = half a GPU
    ("shards", {"tres_per_node": "gres:shard:4"}, 8, (None, 0.5, 1, 0.5, ((None, 0.5),))),
    ("shards-typed-4-per-gpu", {"tres_per_node": "gres:shard:a100:8"}, 4,
     ("a100", 2.0, 1, 2.0, (("a100", 2.0),))),
    # options are constraints on one allocation: --gpus=8 with -N 2 --gpus-per-node=4 is 8
    ("per-job-and-per-node", {"tres_per_job": "gres:gpu:8", "tres_per_node": "gres:gpu:4",
                              "min_nodes": 2}, 8, (None, 4.0, 2, 8.0, ((None, 8.0),))),
    # array tasks are each a job: the GPU request is per task
    ("array-gpu-per-task", {"tres_per_node": "gres:gpu:1", "array_inx": "0-99%10"}, 8,
     (None, 1.0, 1, 1.0, ((None, 1.0),))),
]


@pytest.mark.parametrize(
    ("fields", "shards_per_gpu", "expected"),
    [pytest.param(f, s, e, id=i) for i, f, s, e in GPU_SHAPES],
)
def test_gpu_request_shapes(fields: dict, shards_per_gpu: int, expected: tuple) -> None:
    got = parse_gpu_request(JobRequest(**fields), shards_per_gpu=shards_per_gpu)
    gpu_type, per_node, nodes, total, parts = expected
    assert got == GpuRequest(gpu_type=gpu_type, per_node=per_node, nodes=nodes, total=total,
                             parts=parts)


def test_mixed_request_is_flagged() -> None:
    got = parse_gpu_request(JobRequest(tres_per_node="gres:gpu:a100:2,gres:gpu:h100:1"))
    assert got.mixed and got.gpu_type is None
    assert not parse_gpu_request(JobRequest(tres_per_node="gres:gpu:a100:2")).mixed


def test_gpus_per_socket_uses_sockets_per_node_when_request_has_it() -> None:
    # -N 2 --sockets-per-node=2 --gpus-per-socket=2 = 2 nodes x 2 sockets x 2
    req = _RequestWithSockets(tres_per_socket="gres:gpu:2", min_nodes=2, sockets_per_node=2)
    assert parse_gpu_request(req).total == 8.0


def test_from_wire_gres_field_is_read() -> None:
    req = JobRequest.from_wire({"gres": "gres:gpu:a100:2", "min_nodes": 2})
    assert parse_gpu_request(req).total == 4.0


# id, field, bad string, words the message must contain
BAD_GPU_STRINGS = [
    ("word-count", "tres_per_node", "gres:gpu:a100:two", ["'two'", "--gres=gpu:a100:2"]),
    ("k-suffix", "tres_per_node", "gres:gpu:2k", ["2048 GPUs", "plain number"]),
    ("suffix-typed", "tres_per_job", "gres:gpu:a100:1g", ["unit suffix", "--gpus=a100:4"]),
    ("negative", "tres_per_node", "gres:gpu:a100:-1", ["'-1'", "whole number"]),
    ("empty-type", "tres_per_node", "gres:gpu::2", ["empty GPU type"]),
    ("bad-type-chars", "tres_per_node", "gres:gpu:a1$0:2", ["'a1$0'", "not a valid name"]),
    ("too-many-fields", "tres_per_task", "gres:gpu:a100:2:3", ["fields", "--gpus-per-task"]),
    ("equals-not-number", "tres_per_node", "gres/gpu=abc", ["'abc'"]),
    ("equals-empty", "tres_per_node", "gres/gpu:a100=", ["whole number"]),
    ("absurd-count", "tres_per_node", "gres:gpu:99999999", ["more than any cluster"]),
    ("bad-shard-count", "tres_per_socket", "gres:shard:a100:x", ["--gpus-per-socket"]),
]


@pytest.mark.parametrize(
    ("field", "text", "words"),
    [pytest.param(f, t, w, id=i) for i, f, t, w in BAD_GPU_STRINGS],
)
def test_bad_gpu_strings_explain_themselves(field: str, text: str, words: list[str]) -> None:
    with pytest.raises(GpuRequestError) as caught:
        parse_gpu_request(JobRequest(**{field: text}))
    message = str(caught.value)
    assert text.strip() in message and "Write it as" in message
    for word in words:
        assert word in message


def test_gpu_request_error_is_a_value_error() -> None:
    assert issubclass(GpuRequestError, ValueError)


ARRAYS = [
    ("no-array", None, (1, None)),
    ("empty", "", (1, None)),
    ("range", "0-99", (100, None)),
    ("list", "1,3,5", (3, None)),
    ("stepped", "0-15:4", (4, None)),  # 0 4 8 12
    ("throttled", "0-99%10", (100, 10)),
    ("single", "7", (1, None)),
    ("overlap-counts-once", "1-5,3-7", (7, None)),
    ("mixed-throttled", "1-5,10,20-30:5%4", (9, 4)),  # 5 + 1 + (20 25 30)
    ("throttle-0-is-none", "0-3%0", (4, None)),
]


@pytest.mark.parametrize(("text", "expected"), [pytest.param(t, e, id=i) for i, t, e in ARRAYS])
def test_parse_array(text: str | None, expected: tuple[int, int | None]) -> None:
    assert parse_array(text) == expected


BAD_ARRAYS = [
    ("backwards", "5-2", "ends before it starts"),
    ("step-0", "0-15:0", "step 0"),
    ("word", "abc", "'abc'"),
    ("empty-element", "1,,2", "empty element"),
    ("bad-throttle", "0-10%x", "throttle"),
    ("huge", "0-99999999", "largest possible index"),
]


@pytest.mark.parametrize(("text", "words"), [pytest.param(t, w, id=i) for i, t, w in BAD_ARRAYS])
def test_bad_arrays_explain_themselves(text: str, words: str) -> None:
    with pytest.raises(GpuRequestError) as caught:
        parse_array(text)
    assert words in str(caught.value) and "--array=0-99%10" in str(caught.value)

"""The SPEC's task rules, checked on the pure domain (no database)."""

from __future__ import annotations

import pytest

from app.domain.assets import (
    DataManagerInfo,
    DataSampleInfo,
    FunctionInfo,
    ModelInfo,
    TaskOutput,
)
from app.domain.errors import Conflict, Forbidden, InvalidCommand
from app.domain.functions import InputKind, InputSpec, OutputKind, OutputSpec, validate_io
from app.domain.permissions import Permission, Permissions, permissions
from app.domain.plans import PlanStatus, cancel_plan, plan_status
from app.domain.tasks import (
    ErrorType,
    OutputRequest,
    PlanInfo,
    RegistrationContext,
    StoredTask,
    TaskCategory,
    TaskInput,
    TaskRequest,
    TaskStatus,
    change_status,
    check_output_registration,
    children_ready,
    initial_status,
    missing_outputs,
    register_tasks,
    transient_outputs_to_disable,
)

ORGS = frozenset({"org-a", "org-b", "org-c"})
AB = Permissions(Permission(False, ("org-a", "org-b")), Permission(False, ("org-a", "org-b")))
PUBLIC = Permissions(Permission.everyone(), Permission.everyone())

TRAIN = FunctionInfo(
    key="f-train", owner="org-a", permissions=PUBLIC,
    inputs={
        "opener": InputSpec(InputKind.DATA_MANAGER),
        "datasamples": InputSpec(InputKind.DATA_SAMPLE, multiple=True),
        "model": InputSpec(InputKind.MODEL, optional=True),
    },
    outputs={"model": OutputSpec(OutputKind.MODEL)},
)
AGGREGATE = FunctionInfo(
    key="f-agg", owner="org-a", permissions=PUBLIC,
    inputs={"models": InputSpec(InputKind.MODEL, multiple=True)},
    outputs={"model": OutputSpec(OutputKind.MODEL)},
)
TEST = FunctionInfo(
    key="f-test", owner="org-a", permissions=PUBLIC,
    inputs={
        "opener": InputSpec(InputKind.DATA_MANAGER),
        "datasamples": InputSpec(InputKind.DATA_SAMPLE, multiple=True),
        "model": InputSpec(InputKind.MODEL),
    },
    outputs={"performance": OutputSpec(OutputKind.PERFORMANCE)},
)
COMPOSITE = FunctionInfo(
    key="f-comp", owner="org-a", permissions=PUBLIC,
    inputs={
        "opener": InputSpec(InputKind.DATA_MANAGER),
        "datasamples": InputSpec(InputKind.DATA_SAMPLE, multiple=True),
    },
    outputs={"local": OutputSpec(OutputKind.MODEL), "shared": OutputSpec(OutputKind.MODEL)},
)
MULTI_OUT = FunctionInfo(
    key="f-multi", owner="org-a", permissions=PUBLIC,
    inputs={"models": InputSpec(InputKind.MODEL, multiple=True)},
    outputs={"models": OutputSpec(OutputKind.MODEL, multiple=True)},
)
DM_A = DataManagerInfo("dm-a", "org-a", AB, Permission(False, ("org-a",)))
DM_B = DataManagerInfo("dm-b", "org-b", PUBLIC, Permission(False, ("org-b",)))


def ctx(**overrides: object) -> RegistrationContext:
    base: dict[str, object] = dict(
        orgs=ORGS,
        plan=PlanInfo("plan", "org-a"),
        functions={f.key: f for f in (TRAIN, AGGREGATE, TEST, COMPOSITE, MULTI_OUT)},
        data_managers={"dm-a": DM_A, "dm-b": DM_B},
        data_samples={
            "s-a1": DataSampleInfo("s-a1", "org-a", ("dm-a",)),
            "s-a2": DataSampleInfo("s-a2", "org-a", ("dm-a",)),
            "s-b1": DataSampleInfo("s-b1", "org-b", ("dm-b",)),
        },
        models={"m-old": ModelInfo("m-old", "org-a", PUBLIC, disabled=True)},
    )
    base.update(overrides)
    return RegistrationContext(**base)  # type: ignore[arg-type]


def train(key: str, dm: str = "dm-a", samples: tuple[str, ...] = ("s-a1",),
          parent: str | None = None, **kw: object) -> TaskRequest:
    inputs = [TaskInput("opener", asset_key=dm), *(TaskInput("datasamples", asset_key=s)
                                                   for s in samples)]
    if parent:
        inputs.append(TaskInput("model", parent_task_key=parent, parent_output="model"))
    return TaskRequest(key=key, function_key="f-train", inputs=inputs, **kw)  # type: ignore[arg-type]


def aggregate(key: str, *parents: str, worker: str | None = "org-c") -> TaskRequest:
    return TaskRequest(
        key=key, function_key="f-agg", worker=worker,
        inputs=[TaskInput("models", parent_task_key=p, parent_output="model") for p in parents],
    )


def stored(key: str, status: TaskStatus, *, owner: str = "org-a", worker: str = "org-a",
           parents: tuple[str, ...] = (), rank: int = 0, transient: bool = False) -> StoredTask:
    return StoredTask(
        key=key, owner=owner, worker=worker, rank=rank, status=status, compute_plan_key="plan",
        outputs={"model": TaskOutput(OutputKind.MODEL, False, PUBLIC, transient)},
        parent_task_keys=parents,
    )


# --- registration -------------------------------------------------------------------------

def test_rank_is_zero_without_parents_else_max_parent_rank_plus_one() -> None:
    shared = {"model": OutputRequest(PUBLIC)}
    events = register_tasks("org-a", [
        aggregate("agg", "t1", "t2b"), train("t1", outputs=shared),
        train("t2", parent="t1", outputs=shared),
        train("t2b", dm="dm-b", samples=("s-b1",), parent="t2", outputs=shared),
    ], ctx())
    ranks = {e.key: e.rank for e in events}
    assert ranks == {"t1": 0, "t2": 1, "t2b": 2, "agg": 3}
    assert [e.key for e in events].index("t1") < [e.key for e in events].index("agg")


def test_rank_counts_stored_parents_too() -> None:
    events = register_tasks("org-a", [train("t", parent="old")],
                            ctx(tasks={"old": stored("old", TaskStatus.DONE, rank=4)}))
    assert events[0].rank == 5


def test_worker_is_inferred_from_the_data_manager() -> None:
    [event] = register_tasks("org-a", [train("t", dm="dm-b", samples=("s-b1",))], ctx())
    assert event.worker == "org-b"


def test_explicit_worker_other_than_data_owner_is_400() -> None:
    with pytest.raises(InvalidCommand) as err:
        register_tasks("org-a", [train("t", worker="org-c")], ctx())
    assert err.value.code == "worker_mismatch"


def test_aggregate_without_worker_is_400() -> None:
    with pytest.raises(InvalidCommand) as err:
        register_tasks("org-a", [train("t1"), aggregate("agg", "t1", worker=None)], ctx())
    assert err.value.code == "worker_required"


def test_unknown_worker_is_400() -> None:
    with pytest.raises(InvalidCommand) as err:
        register_tasks("org-a", [train("t1"), aggregate("agg", "t1", worker="org-z")], ctx())
    assert err.value.code == "unknown_org"


def test_undeclared_input_identifier_is_400() -> None:
    request = TaskRequest("t", "f-agg", [TaskInput("weights", asset_key="m")], worker="org-a")
    with pytest.raises(InvalidCommand) as err:
        register_tasks("org-a", [request], ctx())
    assert err.value.code == "undeclared_input"


def test_input_repeated_only_if_multiple() -> None:
    request = train("t")
    request = TaskRequest("t", "f-train", [*request.inputs, TaskInput("opener", asset_key="dm-a")])
    with pytest.raises(InvalidCommand) as err:
        register_tasks("org-a", [request], ctx())
    assert err.value.code == "input_not_multiple"


def test_missing_required_input_is_400() -> None:
    request = TaskRequest("t", "f-train", [TaskInput("opener", asset_key="dm-a")])
    with pytest.raises(InvalidCommand) as err:
        register_tasks("org-a", [request], ctx())
    assert err.value.code == "missing_input"


def test_parent_output_must_be_declared_and_of_the_same_kind() -> None:
    bad_name = TaskRequest("agg", "f-agg", worker="org-c", inputs=[
        TaskInput("models", parent_task_key="t1", parent_output="weights")])
    with pytest.raises(InvalidCommand) as err:
        register_tasks("org-a", [train("t1"), bad_name], ctx())
    assert err.value.code == "unknown_parent_output"
    test_task = TaskRequest("test", "f-test", inputs=[
        TaskInput("opener", asset_key="dm-a"), TaskInput("datasamples", asset_key="s-a1"),
        TaskInput("model", parent_task_key="t1", parent_output="model")])
    eval_of_perf = TaskRequest("agg", "f-agg", worker="org-c", inputs=[
        TaskInput("models", parent_task_key="test", parent_output="performance")])
    with pytest.raises(InvalidCommand) as err:
        register_tasks("org-a", [train("t1"), test_task, eval_of_perf], ctx())
    assert err.value.code == "input_kind_mismatch"


def test_a_multiple_output_cannot_feed_a_single_input() -> None:
    multi = TaskRequest("m", "f-multi", worker="org-a", inputs=[
        TaskInput("models", parent_task_key="t1", parent_output="model")])
    single = train("t2", parent=None)
    single = TaskRequest("t2", "f-train", [*single.inputs,
                                          TaskInput("model", parent_task_key="m",
                                                    parent_output="models")])
    with pytest.raises(InvalidCommand) as err:
        register_tasks("org-a", [train("t1"), multi, single], ctx())
    assert err.value.code == "input_not_multiple"


def test_samples_of_another_data_manager_are_400() -> None:
    with pytest.raises(InvalidCommand) as err:
        register_tasks("org-a", [train("t", samples=("s-a1", "s-b1"))], ctx())
    assert err.value.code == "sample_not_in_data_manager"


def test_cycle_is_400() -> None:
    with pytest.raises(InvalidCommand) as err:
        register_tasks("org-a", [train("t1", parent="t2"), train("t2", parent="t1")], ctx())
    assert err.value.code == "cycle"


def test_unknown_parent_is_400() -> None:
    with pytest.raises(InvalidCommand) as err:
        register_tasks("org-a", [train("t1", parent="ghost")], ctx())
    assert err.value.code == "unknown_parent"


def test_batch_is_atomic_one_bad_task_registers_nothing() -> None:
    with pytest.raises(InvalidCommand):
        register_tasks("org-a", [train("ok1"), train("ok2"), train("bad", dm="dm-x")], ctx())


def test_an_existing_key_is_409_with_that_key() -> None:
    with pytest.raises(Conflict) as err:
        register_tasks("org-a", [train("t1")], ctx(existing_keys=frozenset({"t1"})))
    assert err.value.key == "t1"


def test_only_the_plan_owner_adds_tasks() -> None:
    with pytest.raises(Forbidden):
        register_tasks("org-b", [train("t1")], ctx())


def test_orgc_may_not_use_a_dataset_shared_with_a_and_b() -> None:
    plan_c = PlanInfo("plan", "org-c")
    with pytest.raises(Forbidden):
        register_tasks("org-c", [train("t1")], ctx(plan=plan_c))
    plan_b = PlanInfo("plan", "org-b")
    [event] = register_tasks("org-b", [train("t1")], ctx(plan=plan_b))
    assert event.worker == "org-a"  # orgB runs tasks on orgA's dataset, on orgA


def test_orgc_may_not_use_a_function_shared_with_a_and_b() -> None:
    private = FunctionInfo("f-priv", "org-a", AB, TRAIN.inputs, TRAIN.outputs)
    functions = {"f-priv": private}
    request = TaskRequest("t", "f-priv", train("t", dm="dm-b", samples=("s-b1",)).inputs)
    with pytest.raises(Forbidden):
        register_tasks("org-c", [request], ctx(functions=functions, plan=PlanInfo("plan", "org-c")))
    [event] = register_tasks("org-b", [request], ctx(functions=functions,
                                                    plan=PlanInfo("plan", "org-b")))
    assert event.worker == "org-b"


def test_worker_must_be_able_to_process_parent_outputs() -> None:
    private_to_a = Permissions(Permission(False, ("org-a",)), Permission(False, ("org-a",)))
    requests = [train("t1", outputs={"model": OutputRequest(private_to_a)}),
                aggregate("agg", "t1", worker="org-c")]
    with pytest.raises(Forbidden) as err:
        register_tasks("org-a", requests, ctx())
    assert err.value.code == "worker_cannot_process"


def test_a_disabled_transient_model_cannot_be_used() -> None:
    request = TaskRequest("agg", "f-agg", worker="org-a",
                          inputs=[TaskInput("models", asset_key="m-old")])
    with pytest.raises(InvalidCommand) as err:
        register_tasks("org-a", [request], ctx())
    assert err.value.code == "disabled_model"
    from_parent = aggregate("agg", "old")
    with pytest.raises(InvalidCommand):
        register_tasks("org-a", [from_parent], ctx(
            tasks={"old": stored("old", TaskStatus.DONE, transient=True)},
            disabled_outputs=frozenset({("old", "model")})))


def test_performance_output_is_public_and_never_transient() -> None:
    def test_task(out: OutputRequest) -> TaskRequest:
        return TaskRequest("test", "f-test", outputs={"performance": out}, inputs=[
            TaskInput("opener", asset_key="dm-a"), TaskInput("datasamples", asset_key="s-a1"),
            TaskInput("model", parent_task_key="t1", parent_output="model")])
    [_, event] = register_tasks("org-a", [train("t1"), test_task(OutputRequest())], ctx())
    assert event.outputs["performance"]["permissions"]["process"]["public"] is True
    assert event.category == TaskCategory.TEST
    with pytest.raises(InvalidCommand) as err:
        register_tasks("org-a", [train("t1"), test_task(OutputRequest(transient=True))], ctx())
    assert err.value.code == "performance_transient"
    private = Permissions(Permission(False, ()), Permission(False, ()))
    with pytest.raises(InvalidCommand) as err:
        register_tasks("org-a", [train("t1"), test_task(OutputRequest(private))], ctx())
    assert err.value.code == "performance_public"


def test_composite_head_output_is_private_to_the_worker() -> None:
    request = TaskRequest(
        "c", "f-comp", category=TaskCategory.COMPOSITE,
        inputs=[TaskInput("opener", asset_key="dm-b"), TaskInput("datasamples", asset_key="s-b1")],
        outputs={"local": OutputRequest(PUBLIC), "shared": OutputRequest(PUBLIC)},
    )
    [event] = register_tasks("org-a", [request], ctx())
    assert event.outputs["local"]["permissions"]["process"] == {
        "public": False, "authorized_ids": ["org-b"]}
    assert event.outputs["shared"]["permissions"]["process"]["public"] is True


def test_output_permissions_always_include_the_worker() -> None:
    only_c = Permissions(Permission(False, ("org-c",)), Permission(False, ("org-c",)))
    [event] = register_tasks("org-a", [train("t1", outputs={"model": OutputRequest(only_c)})],
                             ctx())
    assert event.outputs["model"]["permissions"]["process"]["authorized_ids"] == [
        "org-a", "org-c"]


# --- permissions ------------------------------------------------------------------------------

def test_permissions_add_the_owner_and_refuse_unknown_orgs() -> None:
    perms = permissions((False, ["org-b"]), None, "org-a", ORGS)
    assert perms.process.authorized_ids == ("org-a", "org-b")
    assert perms.download == perms.process
    with pytest.raises(InvalidCommand):
        permissions((False, ["org-z"]), None, "org-a", ORGS)


# --- functions --------------------------------------------------------------------------------

def test_function_with_two_data_managers_or_dm_without_samples_is_refused() -> None:
    with pytest.raises(InvalidCommand):
        validate_io({"a": InputSpec(InputKind.DATA_MANAGER), "b": InputSpec(
            InputKind.DATA_MANAGER), "s": InputSpec(InputKind.DATA_SAMPLE)}, {})
    with pytest.raises(InvalidCommand):
        validate_io({"a": InputSpec(InputKind.DATA_MANAGER)}, {})
    with pytest.raises(InvalidCommand):
        validate_io({"s": InputSpec(InputKind.DATA_SAMPLE)}, {})
    with pytest.raises(InvalidCommand):
        validate_io({"a": InputSpec(InputKind.DATA_MANAGER, optional=True),
                     "s": InputSpec(InputKind.DATA_SAMPLE)}, {})


def test_performance_output_is_never_multiple() -> None:
    with pytest.raises(InvalidCommand):
        validate_io({}, {"p": OutputSpec(OutputKind.PERFORMANCE, multiple=True)})


# --- lifecycle --------------------------------------------------------------------------------

@pytest.mark.parametrize(("parents", "expected"), [
    ([], TaskStatus.TODO),
    ([TaskStatus.DONE, TaskStatus.DONE], TaskStatus.TODO),
    ([TaskStatus.DONE, TaskStatus.DOING], TaskStatus.WAITING),
    ([TaskStatus.DONE, TaskStatus.FAILED], TaskStatus.CANCELED),
    ([TaskStatus.CANCELED], TaskStatus.CANCELED),
])
def test_initial_status_todo_waiting_or_canceled(
    parents: list[TaskStatus], expected: TaskStatus
) -> None:
    assert initial_status(parents) is expected


def test_only_the_worker_moves_a_task_to_doing_done_failed() -> None:
    task = stored("t", TaskStatus.TODO, owner="org-a", worker="org-b")
    with pytest.raises(Forbidden):
        change_status(task, TaskStatus.DOING, "org-a")
    assert change_status(task, TaskStatus.DOING, "org-b").status == "DOING"
    doing = stored("t", TaskStatus.DOING, owner="org-a", worker="org-b")
    with pytest.raises(Forbidden):
        change_status(doing, TaskStatus.DONE, "org-a")
    failed = change_status(doing, TaskStatus.FAILED, "org-b", error_type=ErrorType.BUILD)
    assert failed.error_type == "BUILD"


def test_only_the_owner_cancels() -> None:
    task = stored("t", TaskStatus.DOING, owner="org-a", worker="org-b")
    with pytest.raises(Forbidden):
        change_status(task, TaskStatus.CANCELED, "org-b")
    assert change_status(task, TaskStatus.CANCELED, "org-a").status == "CANCELED"


@pytest.mark.parametrize("final", [TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.CANCELED])
def test_final_states_are_final(final: TaskStatus) -> None:
    task = stored("t", final)
    for target in (TaskStatus.DOING, TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.CANCELED):
        with pytest.raises(InvalidCommand) as err:
            change_status(task, target, "org-a")
        assert err.value.code == "bad_transition"


def test_waiting_cannot_start_and_todo_cannot_finish() -> None:
    with pytest.raises(InvalidCommand):
        change_status(stored("t", TaskStatus.WAITING), TaskStatus.DOING, "org-a")
    with pytest.raises(InvalidCommand):
        change_status(stored("t", TaskStatus.TODO), TaskStatus.DONE, "org-a")


def test_done_requires_every_output_registered() -> None:
    task = stored("t", TaskStatus.DOING)
    missing = missing_outputs(task, {})
    assert missing == ["model"]
    with pytest.raises(InvalidCommand) as err:
        change_status(task, TaskStatus.DONE, "org-a", missing_outputs=missing)
    assert err.value.code == "outputs_missing"
    assert change_status(task, TaskStatus.DONE, "org-a",
                         missing_outputs=missing_outputs(task, {"model": 1})).status == "DONE"


def test_outputs_only_while_doing_by_the_worker_once_unless_multiple() -> None:
    todo = stored("t", TaskStatus.TODO, worker="org-b")
    with pytest.raises(InvalidCommand):
        check_output_registration(todo, "model", OutputKind.MODEL, "org-b", 0)
    doing = stored("t", TaskStatus.DOING, worker="org-b")
    with pytest.raises(Forbidden):
        check_output_registration(doing, "model", OutputKind.MODEL, "org-a", 0)
    with pytest.raises(InvalidCommand):
        check_output_registration(doing, "model", OutputKind.PERFORMANCE, "org-b", 0)
    with pytest.raises(InvalidCommand):
        check_output_registration(doing, "other", OutputKind.MODEL, "org-b", 0)
    check_output_registration(doing, "model", OutputKind.MODEL, "org-b", 0)
    with pytest.raises(Conflict):
        check_output_registration(doing, "model", OutputKind.MODEL, "org-b", 1)


def test_child_becomes_todo_when_all_parents_done() -> None:
    child = stored("c", TaskStatus.WAITING, parents=("p1", "p2"))
    statuses = {"p1": TaskStatus.DONE, "p2": TaskStatus.DOING}
    assert children_ready("p1", [child], statuses) == []
    statuses["p2"] = TaskStatus.DONE
    assert children_ready("p2", [child], statuses) == [child]


def test_transient_output_disabled_once_all_consumers_are_final() -> None:
    parent = stored("p", TaskStatus.DONE, transient=True)
    consumers = {"model": [stored("c1", TaskStatus.DONE), stored("c2", TaskStatus.DOING)]}
    assert transient_outputs_to_disable(parent, consumers) == []
    consumers["model"][1] = stored("c2", TaskStatus.FAILED)
    assert transient_outputs_to_disable(parent, consumers) == ["model"]
    kept = stored("p", TaskStatus.DONE, transient=False)
    assert transient_outputs_to_disable(kept, consumers) == []


# --- plans ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("counts", "canceled", "expected"), [
    ({}, False, PlanStatus.EMPTY),
    ({TaskStatus.TODO: 2, TaskStatus.WAITING: 1}, False, PlanStatus.CREATED),
    ({TaskStatus.DOING: 1, TaskStatus.WAITING: 1}, False, PlanStatus.DOING),
    ({TaskStatus.DONE: 3}, False, PlanStatus.DONE),
    ({TaskStatus.DONE: 1, TaskStatus.FAILED: 1, TaskStatus.WAITING: 1}, False, PlanStatus.FAILED),
    ({TaskStatus.DONE: 3}, True, PlanStatus.CANCELED),
])
def test_plan_status_derivation(
    counts: dict[TaskStatus, int], canceled: bool, expected: PlanStatus
) -> None:
    assert plan_status(counts, canceled) is expected


def test_plan_cancel_cascades_to_non_final_tasks_only() -> None:
    tasks = [stored("a", TaskStatus.DONE), stored("b", TaskStatus.DOING),
             stored("c", TaskStatus.WAITING)]
    events = cancel_plan("plan", "org-a", "org-a", False, tasks)
    assert [e.asset_key for e in events] == ["plan", "b", "c"]
    with pytest.raises(Forbidden):
        cancel_plan("plan", "org-a", "org-b", False, tasks)

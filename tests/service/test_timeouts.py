"""A request's deadline: the call's own timeout, else the `[timeout_s]` setting of its task type,
else the task table's default (`TaskInfo.timeout_s`: the only place the default numbers live)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from modelmora.config import TaskDefaults
from modelmora.ipc import segments
from modelmora.registry import SQLiteStore, install
from modelmora.scheduler import Scheduler
from modelmora.service import InferCall, TextInput
from modelmora.tasks import TASKS, TaskType

from conftest import ECHO, make_settings, running_app, worker_env

pytestmark = pytest.mark.anyio


def test_task_defaults_are_unset_overrides() -> None:
    assert TaskDefaults() == TaskDefaults(None, None, None, None, None)
    assert set(TaskDefaults.__struct_fields__) == {t.value for t in TaskType}


@pytest.mark.parametrize(
    ("overrides", "call_timeout_s", "want_s"),
    [
        ({}, None, TASKS[TaskType.TXT2EMBED].timeout_s),
        ({"timeout_s": {"txt2embed": 5.0}}, None, 5.0),
        ({"timeout_s": {"txt2txt": 5.0}}, None, TASKS[TaskType.TXT2EMBED].timeout_s),  # another task's
        ({"timeout_s": {"txt2embed": 5.0}}, 2.5, 2.5),
    ],
)
async def test_the_deadline_comes_from_the_call_the_settings_or_the_task_table(
    tmp_path: Path, echo_dir: Path, overrides: dict[str, Any], call_timeout_s: float | None, want_s: float
) -> None:
    home = tmp_path / "home"
    settings = make_settings(home, **overrides)
    store = SQLiteStore(home / "registry.sqlite3")
    install(store, home, str(echo_dir), model_id="echo", task="txt2embed")
    scheduler = Scheduler(settings, segments.new_instance_id(), pipelines=ECHO, worker_env=worker_env())
    async with running_app(settings, store, scheduler) as app:
        before = anyio.current_time()
        job = await app.service._start(InferCall("echo", TextInput("hello"), timeout_s=call_timeout_s))
        job.prepared.release()
        assert job.timeout_s == want_s
        assert before + want_s <= job.request.deadline <= anyio.current_time() + want_s

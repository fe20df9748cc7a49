"""A model folder's task is decided in one place, ModelFacts.task (read by model_facts.py, the one reader of
a folder's files): a models file entry without `task:` gets it, and an embedding model's plan refuses a
folder of another task, for each kind of folder the test builders make."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedding_service.backends.base import BackendLoadError
from embedding_service.backends.model.facts import read_model_facts
from embedding_service.engine.types import EMBED, MULTIVECTOR, SPARSE, TASKS
from embedding_service.service import plan_model

from .conftest import make_settings, task_found

REFUSED = {SPARSE: "is a sparse \\(SPLADE\\) model", MULTIVECTOR: "is a multi-vector \\(ColBERT, PyLate\\) model"}


@pytest.mark.parametrize(("folder", "task"), [
    ("tiny_qwen_dir", EMBED),
    ("cross_encoder_dir", EMBED),  # a reranker is served only when asked for (task: rerank)
    ("random_splade_dir", EMBED),  # a bare masked-LM folder: sparse only when asked for (task: sparse)
    ("inference_free_dir", SPARSE),
    ("colbert_dir", MULTIVECTOR),
])
def test_a_folders_task_is_decided_in_one_place(request: pytest.FixtureRequest, tmp_path: Path, folder: str,
                                                task: str) -> None:
    model_dir: Path = request.getfixturevalue(folder)
    found = read_model_facts(model_dir).task
    assert found == task and found in TASKS
    assert task_found(tmp_path, model_dir) == found  # a models file entry without task:
    settings = make_settings(engine="torch", model_path=str(model_dir))
    if found == EMBED:
        assert plan_model(settings, EMBED).facts.task == EMBED
    else:
        with pytest.raises(BackendLoadError, match=REFUSED[found]):
            plan_model(settings, EMBED)

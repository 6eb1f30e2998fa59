"""Start-up error messages name the bad value and the fix, once per problem (issue 13, minor)."""
from __future__ import annotations

import shutil

import pytest

from data.shards import expand_patterns
from pretrain.settings.config import ConfigError, build_config
from pretrain.runtime.dist import from_environ

from tests.test_train_support import embedded, train_args  # noqa: F401

SINGLE = from_environ({})


def problems(embedded, tmp_path, *extra: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        build_config(train_args(embedded, tmp_path / "run", *extra), SINGLE, cuda=False)
    return [line for line in str(e.value).splitlines() if line.strip()]


def test_globs_expand_like_brace_patterns(embedded, tmp_path):
    for name in ("good-0.tar", "good-1.tar", "other.tar"):
        shutil.copy(next((embedded / "shards").glob("train-*.tar")), tmp_path / name)
    assert expand_patterns(str(tmp_path / "good-*.tar")) == [str(tmp_path / "good-0.tar"), str(tmp_path / "good-1.tar")]
    assert expand_patterns(str(tmp_path / "none-*.tar")) == [str(tmp_path / "none-*.tar")]  # then "not found"


def test_missing_shards_message_says_what_to_do(embedded, tmp_path):
    (msg,) = [p for p in problems(embedded, tmp_path, "--train-data", str(tmp_path / "x/{0..3}.tar")) if "--train-data" in p]
    assert "4 of 4 shards not found" in msg and "check the path" in msg


def test_negative_lr_is_one_problem(embedded, tmp_path):
    msgs = problems(embedded, tmp_path, "--lr", "-1")
    assert [m for m in msgs if "lr" in m.lower()] == [m for m in msgs if "learning rate -1.0 must be > 0" in m], msgs


def test_unknown_model_does_not_blame_the_tokenizer(embedded, tmp_path):
    msgs = problems(embedded, tmp_path, "--model", "ViT-Q-99")
    assert any("--model ViT-Q-99: unknown model" in m for m in msgs), msgs
    assert not any("--tokenizer" in m for m in msgs), msgs

"""A cluster ddft starts has a token of its own (ddft.cluster.token_env): made once, readable by its
user alone, reused by its clients, and refused when someone else could have planted or read it."""

from __future__ import annotations

import os
import stat

import pytest

from ddft.cluster import token_env, use_token


def test_the_token_is_made_once_for_this_user_alone(tmp_path):
    env = token_env(tmp_path / "cluster")
    path = tmp_path / "cluster" / "auth_token"
    assert env == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}
    token = path.read_text()
    assert len(token) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token_env(tmp_path / "cluster") == env and path.read_text() == token  # a client reuses it
    assert token_env(tmp_path / "other")["RAY_AUTH_TOKEN_PATH"] != str(path)
    assert (tmp_path / "other" / "auth_token").read_text() != token


def test_a_token_others_can_read_is_refused_with_the_fix(tmp_path):
    token_env(tmp_path)
    os.chmod(tmp_path / "auth_token", 0o644)
    with pytest.raises(PermissionError, match="not this user's alone.*remove it"):
        token_env(tmp_path)


def test_a_client_environment_points_at_the_file_and_drops_an_inline_token(tmp_path):
    env = use_token({"RAY_AUTH_TOKEN": "someone-elses", "PATH": "/bin"}, tmp_path)
    assert env == {"PATH": "/bin", **token_env(tmp_path)}

"""`opstwin user`, `opstwin token` and `opstwin audit`: every path, and hostile input refused.

In-process through `main` with a real config and control.db in a temporary folder; stdin is
replaced where a password is piped in. Exit codes as the README says: 0 done, 1 a runtime
failure (a broken audit chain), 2 the command line's fault.
"""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.cli import main
from gateway.control import AccountStore, AuthError, ControlDB
from gateway.control.users import MAX_PASSWORD, USER_REFUSED

PASSWORD = "s3cret pass"


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "site.yaml"
    data = {
        "site_id": "plant-a",
        "gateway_id": "gw-1",
        "storage": {"path": "state/twin.db"},
        "devices": [],
    }
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture
def control_db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "control.db"


def run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str, stdin: str = ""
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cli(monkeypatch, capsys):
    def call(*argv: str, stdin: str = "") -> tuple[int, str, str]:
        return run(monkeypatch, capsys, *argv, stdin=stdin)

    return call


def add_user(cli, config, name="alice", *grants: str, password=PASSWORD):
    return cli(
        "user",
        "add",
        "-c",
        config,
        name,
        *[a for g in grants or ("admin",) for a in ("--grant", g)],
        "--password-stdin",
        stdin=password + "\n",
    )


def authenticate(control_db: Path, name: str, password: str):
    with ControlDB(control_db) as db:
        return AccountStore(db).authenticate_user(name, password)


# -- user ---------------------------------------------------------------------------------------


def test_user_add_then_login(cli, config, control_db):
    code, out, _ = add_user(cli, config, "alice", "supervisor:plant/oven1/*", "viewer")
    assert (code, out) == (0, "user alice added (supervisor:plant/oven1/* viewer:*)\n")
    principal = authenticate(control_db, "alice", PASSWORD)
    assert [g.role for g in principal.grants] == ["supervisor", "viewer"]


def test_user_add_creates_control_db_beside_the_twin_not_in_it(cli, config, control_db):
    add_user(cli, config)
    assert control_db.exists()
    assert not (control_db.parent / "twin.db").exists()


def test_user_list(cli, config):
    add_user(cli, config, "bob", "viewer")
    add_user(cli, config, "alice")
    cli("user", "disable", "-c", config, "bob")
    code, out, _ = cli("user", "list", "-c", config)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["user", "grants", "state", "created"]
    assert lines[2].split()[:2] == ["alice", "admin:*"]
    assert lines[3].split()[:3] == ["bob", "viewer:*", "disabled"]


def test_a_disabled_user_cannot_authenticate(cli, config, control_db):
    add_user(cli, config)
    assert cli("user", "disable", "-c", config, "alice")[:2] == (0, "user alice disabled\n")
    with pytest.raises(AuthError) as info:
        authenticate(control_db, "alice", PASSWORD)
    assert info.value.why == "user is disabled"


def test_wrong_password_and_unknown_user_give_the_same_error(cli, config, control_db):
    add_user(cli, config)
    with pytest.raises(AuthError) as wrong:
        authenticate(control_db, "alice", "not the password")
    with pytest.raises(AuthError) as unknown:
        authenticate(control_db, "nobody", PASSWORD)
    assert str(wrong.value) == str(unknown.value) == USER_REFUSED


def test_user_passwd(cli, config, control_db):
    add_user(cli, config)
    code, out, _ = cli(
        "user", "passwd", "-c", config, "alice", "--password-stdin", stdin="new pw 123\n"
    )
    assert (code, out) == (0, "password of user alice changed\n")
    assert authenticate(control_db, "alice", "new pw 123").name == "alice"
    with pytest.raises(AuthError):
        authenticate(control_db, "alice", PASSWORD)


def test_user_passwd_of_nobody_asks_for_no_password(cli, config):
    add_user(cli, config)
    code, _, err = cli("user", "passwd", "-c", config, "ghost", "--password-stdin", stdin="")
    assert code == 2 and "no user named 'ghost'" in err


def test_user_disable_of_nobody(cli, config):
    add_user(cli, config)
    code, _, err = cli("user", "disable", "-c", config, "ghost")
    assert code == 2 and "no user named 'ghost'; `opstwin user list` shows them" in err


def test_user_add_twice(cli, config):
    add_user(cli, config)
    code, _, err = add_user(cli, config)
    assert code == 2 and "exists already" in err


def test_password_prompt_on_a_terminal(cli, config, control_db, monkeypatch, capsys):
    answers = iter(["typed pass 1", "typed pass 1"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    monkeypatch.setattr(sys, "stdin", _Tty())
    assert main(["user", "add", "-c", config, "carol", "--grant", "viewer"]) == 0
    assert authenticate(control_db, "carol", "typed pass 1").name == "carol"


def test_password_prompt_that_differs(config, monkeypatch, capsys):
    answers = iter(["typed pass 1", "typed pass 2"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    monkeypatch.setattr(sys, "stdin", _Tty())
    assert main(["user", "add", "-c", config, "carol", "--grant", "viewer"]) == 2
    assert "the passwords differ" in capsys.readouterr().err


def test_no_prompt_and_no_password_stdin_is_refused(cli, config):
    code, _, err = cli("user", "add", "-c", config, "alice", "--grant", "admin", stdin="pw\n")
    assert code == 2 and "pass --password-stdin" in err


def test_a_password_is_never_taken_from_argv(cli, config):
    with pytest.raises(SystemExit) as info:
        cli("user", "add", "-c", config, "alice", "--grant", "admin", "--password", PASSWORD)
    assert info.value.code == 2


@pytest.mark.parametrize(
    ("grant", "says"),
    [
        ("root", "unknown role 'root'; one of viewer, agent, supervisor, executor, admin"),
        ("viewer:plant/oven(1|2)", "'(' at 10 is not allowed"),
        ("supervisor:plant/[9-0]", "reversed"),
        ("agent:", "empty asset glob"),
    ],
)
def test_grants_outside_rbac_are_refused_at_user_add(cli, config, control_db, grant, says):
    code, _, err = add_user(cli, config, "alice", grant)
    assert code == 2 and says in err and err.startswith("opstwin: grant ")
    assert not control_db.exists()  # refused before anything was written


@pytest.mark.parametrize(
    "name", ["al\x1bice", "bob\nmallory", "_alice", "x" * 65, "ålice", "a b", "../etc"]
)
def test_hostile_names_are_refused(cli, config, control_db, name):
    code, _, err = add_user(cli, config, name)
    assert code == 2 and "is not allowed: use 1-64 letters" in err
    assert "\x1b" not in err and "\nmallory" not in err
    assert not control_db.exists()


def test_a_10_mb_password_on_stdin_is_refused(cli, config, control_db):
    code, _, err = add_user(cli, config, "alice", password="x" * 10_000_000)
    assert code == 2 and f"longer than {MAX_PASSWORD} characters" in err
    assert len(err) < 200


@pytest.mark.parametrize(
    ("password", "says"),
    [("", "too short"), ("short", "too short"), ("with\0nul char", "NUL")],
)
def test_bad_passwords_on_stdin_are_refused(cli, config, password, says):
    code, _, err = add_user(cli, config, "alice", password=password)
    assert code == 2 and says in err


def test_a_windows_line_ending_is_not_part_of_the_password(cli, config, control_db):
    cli(
        "user",
        "add",
        "-c",
        config,
        "alice",
        "-g",
        "admin",
        "--password-stdin",
        stdin="pw 12345\r\n",
    )
    assert authenticate(control_db, "alice", "pw 12345").name == "alice"


def test_a_password_that_is_not_utf8_is_refused(config, monkeypatch, capsys):
    stdin = io.TextIOWrapper(io.BytesIO(b"\xff\xfe bad bytes\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert main(["user", "add", "-c", config, "alice", "-g", "admin", "--password-stdin"]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err


# -- token --------------------------------------------------------------------------------------


def test_token_create_prints_the_secret_alone(cli, config, control_db):
    code, out, err = cli("token", "create", "-c", config, "oven-agent", "-g", "agent:plant/oven1/*")
    secret = out.strip()
    assert code == 0 and out == secret + "\n" and secret.startswith("otw_")
    assert "shown only now" in err and secret not in err
    with ControlDB(control_db) as db:
        assert AccountStore(db).authenticate_token(secret).name == "oven-agent"


def test_token_list_never_shows_secrets(cli, config, control_db):
    secret = cli("token", "create", "-c", config, "a1", "-g", "agent")[1].strip()
    cli("token", "create", "-c", config, "a2", "-g", "executor:plant/*")
    with ControlDB(control_db) as db:
        AccountStore(db).authenticate_token(secret)
    cli("token", "revoke", "-c", config, "a2")
    code, out, _ = cli("token", "list", "-c", config)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["id", "token", "grants"]
    assert lines[2].split()[:3] == ["1", "a1", "agent:*"] and "never" not in lines[2]
    assert lines[3].split()[:3] == ["2", "a2", "executor:plant/*"] and "revoked" in lines[3]
    assert secret not in out and secret[4:] not in out


def test_a_revoked_token_cannot_authenticate(cli, config, control_db):
    secret = cli("token", "create", "-c", config, "a1", "-g", "agent")[1].strip()
    assert cli("token", "revoke", "-c", config, "a1")[:2] == (0, "token a1 (id 1) revoked\n")
    with ControlDB(control_db) as db, pytest.raises(AuthError) as info:
        AccountStore(db).authenticate_token(secret)
    assert info.value.why == "token is revoked"


def test_token_revoke_of_nobody(cli, config):
    cli("token", "create", "-c", config, "a1", "-g", "agent")
    code, _, err = cli("token", "revoke", "-c", config, "ghost")
    assert code == 2 and "no token named 'ghost'" in err


@pytest.mark.parametrize(
    "secret", ["not-base64!!", "otw_***", "otw_" + "A" * 43 + "\x1b[2J", "", "otw_" + "/" * 43]
)
def test_a_token_that_is_not_base64_is_refused_cleanly(cli, config, control_db, secret):
    cli("token", "create", "-c", config, "a1", "-g", "agent")
    with ControlDB(control_db) as db, pytest.raises(AuthError, match="not an OpsTwin API token"):
        AccountStore(db).authenticate_token(secret)


def test_token_create_refuses_bad_grants_and_names(cli, config):
    assert cli("token", "create", "-c", config, "a1", "-g", "god")[0] == 2
    assert cli("token", "create", "-c", config, "a\x00b", "-g", "agent")[0] == 2
    cli("token", "create", "-c", config, "a1", "-g", "agent")
    code, _, err = cli("token", "create", "-c", config, "a1", "-g", "agent")
    assert code == 2 and "'a1' is taken" in err


# -- audit --------------------------------------------------------------------------------------


def test_audit_records_the_cli_changes(cli, config):
    add_user(cli, config)
    cli("token", "create", "-c", config, "a1", "-g", "agent")
    code, out, _ = cli("audit", "show", "-c", config)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == [
        "seq",
        "time",
        "actor",
        "action",
        "target",
        "decision",
        "reason",
    ]
    assert [line.split()[4:6] for line in lines[2:]] == [
        ["user.added", "alice"],
        ["token.created", "a1"],
    ]


def test_audit_show_limit_newest_last_and_since(cli, config):
    for i in range(5):
        cli("token", "create", "-c", config, f"a{i}", "-g", "agent")
    out = cli("audit", "show", "-c", config, "--limit", "2")[1]
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["4", "5"]
    out = cli("audit", "show", "-c", config, "--since", "1", "--limit", "2")[1]
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["2", "3"]


def test_audit_show_json(cli, config):
    add_user(cli, config)
    code, out, _ = cli("audit", "show", "-c", config, "--json")
    (line,) = out.splitlines()
    row = json.loads(line)
    assert code == 0 and row["seq"] == 1 and len(row["hash"]) == 64
    assert row["entry"]["action"] == "user.added" and row["entry"]["actor"] == "opstwin-cli"


@pytest.mark.parametrize("limit", ["0", "-3", "abc", "10001"])
def test_audit_show_bad_limit(cli, config, limit):
    with pytest.raises(SystemExit) as info:
        cli("audit", "show", "-c", config, "--limit", limit)
    assert info.value.code == 2


def test_audit_verify_intact(cli, config):
    add_user(cli, config)
    add_user(cli, config, "bob")
    code, out, _ = cli("audit", "verify", "-c", config)
    assert code == 0 and out.startswith("audit chain intact: 2 entries, head seq 2")


def test_tampering_with_one_audit_row_is_named_by_verify(cli, config, control_db):
    add_user(cli, config, "alice")
    add_user(cli, config, "bob")
    add_user(cli, config, "carol")
    conn = sqlite3.connect(control_db)
    # The table refuses UPDATE; a tamperer drops the trigger first.
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE audit SET entry = replace(entry, 'bob', 'eve') WHERE seq = 2")
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("UPDATE audit SET entry = replace(entry, 'bob', 'eve') WHERE seq = 2")
    conn.commit()
    conn.close()
    code, out, err = cli("audit", "verify", "-c", config)
    assert code == 1 and out == ""
    assert err.startswith("opstwin: audit chain broken at seq 2: hash mismatch")


def test_audit_show_escapes_what_a_tamperer_wrote(cli, config, control_db):
    add_user(cli, config)
    conn = sqlite3.connect(control_db)
    conn.execute("DROP TRIGGER audit_no_update")
    hostile = json.dumps({"actor": "\x1b[2Jx", "action": "a", "ts": "soon", "reason": "r" * 500})
    conn.execute("UPDATE audit SET entry = ?", (hostile,))
    conn.execute("INSERT INTO audit VALUES (2, 0, 'not json', 'x')")
    conn.commit()
    conn.close()
    code, out, _ = cli("audit", "show", "-c", config)
    assert code == 0 and "\x1b" not in out and "\\x1b[2Jx" in out
    assert "r" * 100 not in out


def test_commands_that_read_need_an_existing_control_db(cli, config, control_db):
    for argv in (
        ("user", "list"),
        ("token", "list"),
        ("audit", "verify"),
        ("audit", "show"),
    ):
        code, _, err = cli(*argv, "-c", config)
        assert code == 2 and "no control database at" in err and "`opstwin user add`" in err
    assert not control_db.exists()


def test_a_damaged_control_db_is_one_line(cli, config, control_db):
    control_db.parent.mkdir()
    control_db.write_bytes(b"garbage" * 1000)
    code, _, err = cli("audit", "verify", "-c", config)
    assert code == 1 and "control database: not an SQLite database" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("group", ["user", "token", "audit"])
def test_a_group_without_an_action(cli, group):
    code, _, err = cli(group)
    assert code == 2 and f"`opstwin {group}` needs an action" in err


def test_a_missing_config_is_exit_2(cli, tmp_path):
    code, _, err = cli("user", "list", "-c", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml" in err


def test_the_installed_command_reads_a_piped_password(config, control_db):
    # One real process: stdin is a pipe, not a StringIO.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli",
            "user",
            "add",
            "-c",
            config,
            "alice",
            "-g",
            "admin",
            "--password-stdin",
        ],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert authenticate(control_db, "alice", PASSWORD).name == "alice"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True

"""`opstwin propose|proposals|proposal|approve|reject|rollback`: the running gateway's HTTP client.

These commands change nothing themselves: they ask the gateway, over its HTTP routes
(gateway/http_proposals.py), as a user or an API token, so that every change goes through the
one gate, with the caller's grants, and into the audit log. Where the gateway is comes from
`--url`, or from a site config's `http.host` and `http.port`; credentials from `--token` /
`OPSTWIN_TOKEN`, or `--user` with the password from `OPSTWIN_PASSWORD` or a prompt.

Exit codes tell a script what happened to the proposal (EXIT_CODES below): 0 succeeded (or, for
`reject` and `rollback`, done), 2 rejected, failed, expired or rolled back, 3 waiting for a person,
1 anything else (no gateway, refused credentials, no such proposal, a usage error; for these
commands argparse's usage errors exit 1 as well, so that a typo never reads as a rejection).
"""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import math
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from gateway import __version__
from gateway.cli import _printable, _when
from gateway.config import load_config
from gateway.errors import ConfigError, GatewayError
from gateway.twin_cli import count_arg, positive_arg

__all__ = [
    "EXIT_CODES",
    "EXIT_DONE",
    "EXIT_ERROR",
    "EXIT_PENDING",
    "EXIT_REFUSED",
    "ClientError",
    "GatewayClient",
    "add_proposal_commands",
    "authorization",
    "exit_code",
    "gateway_url",
    "render",
]

EXIT_DONE = 0
EXIT_ERROR = 1
EXIT_REFUSED = 2
EXIT_PENDING = 3
# A proposal's status → the exit code of the commands that show it.
EXIT_CODES: dict[str, int] = {
    "succeeded": EXIT_DONE,
    "rejected": EXIT_REFUSED,
    "failed": EXIT_REFUSED,
    "expired": EXIT_REFUSED,
    "rolled_back": EXIT_REFUSED,
    "pending_approval": EXIT_PENDING,
    "pending_analysis": EXIT_PENDING,
    "executing": EXIT_PENDING,
}
DEFAULT_TIMEOUT_S = 60.0  # a proposal is simulated and may be written before the answer
USER_AGENT = f"opstwin-cli/{__version__}"

_EPILOG = """\
exit codes: 0 succeeded (reject, rollback: done), 2 rejected, failed, expired or rolled back,
3 waiting for approval or analysis, 1 anything else (gateway unreachable, credentials refused,
no such proposal, not allowed, usage).

where: --url http://HOST:PORT, or --config FILE (its http.host and http.port).
who: --token SECRET or OPSTWIN_TOKEN (an API token, `opstwin token create`), or --user NAME
with the password in OPSTWIN_PASSWORD or typed at the prompt (`opstwin user add`)."""


class ClientError(GatewayError):
    """The command could not get an answer it can show (exit 1, one line)."""


def add_proposal_commands(sub: Any) -> None:
    """Register propose, proposals, proposal, approve, reject and rollback."""
    propose = _command(sub, "propose", "propose a setpoint change to the gate", cmd_propose)
    propose.add_argument("point", help="point id, e.g. line1/oven1/heater_setpoint")
    propose.add_argument("value", type=_number, help="the new value")
    propose.add_argument("--reason", required=True, help="why (kept in the audit log)")
    propose.add_argument(
        "--key", default=None, help="idempotency key: the same key never executes twice"
    )

    listing = _command(sub, "proposals", "list recent proposals, newest first", cmd_proposals)
    listing.add_argument(
        "--status",
        default=None,
        help="only this status: pending, pending_approval, pending_analysis, executing, "
        "succeeded, failed, rejected, rolled_back, expired",
    )
    listing.add_argument(
        "--limit", type=count_arg(1, 1000), default=20, help="most proposals (default 20)"
    )

    show = _command(sub, "proposal", "show one proposal", cmd_proposal)
    show.add_argument("id", help="proposal id, e.g. p-1a2b3c-7")

    approve = _command(sub, "approve", "approve a waiting proposal (it executes)", cmd_approve)
    approve.add_argument("id", help="proposal id")
    approve.add_argument("--comment", default="", help="a comment for the record")

    reject = _command(sub, "reject", "reject a waiting proposal", cmd_reject)
    reject.add_argument("id", help="proposal id")
    reject.add_argument("--reason", default="", help="why")

    rollback = _command(
        sub, "rollback", "restore the value a succeeded change replaced", cmd_rollback
    )
    rollback.add_argument("id", help="proposal id")
    rollback.add_argument("--reason", default="", help="why")


# -- the commands ---------------------------------------------------------------------------------


def cmd_propose(args: argparse.Namespace) -> int:
    """Propose a change and show what the gate made of it."""
    body: dict[str, Any] = {"point": args.point, "value": args.value, "reason": args.reason}
    if args.key is not None:
        body["idempotency_key"] = args.key
    status, answer = _client(args).request("POST", "/proposals", body)
    if status == 403 and isinstance(answer.get("proposal"), dict):
        # Recorded by the gate as a rejection: shown like one, with why on stderr.
        _show(answer["proposal"], args.json)
        print(f"opstwin: {_clean(answer.get('error'), 600)}", file=sys.stderr)
        return EXIT_REFUSED
    record = _expect(status, answer, 201)
    _show(record, args.json)
    return exit_code(record)


def cmd_proposals(args: argparse.Namespace) -> int:
    """List recent proposals."""
    query = urllib.parse.urlencode(
        {"limit": args.limit, **({"status": args.status} if args.status else {})}
    )
    status, answer = _client(args).request("GET", f"/proposals?{query}")
    records = _expect(status, answer, 200).get("proposals")
    if not isinstance(records, list):
        raise ClientError("the gateway's answer has no `proposals` list; is it an OpsTwin gateway?")
    if args.json:
        for record in records:
            print(json.dumps(record))
        return EXIT_DONE
    if not records:
        print("no proposals" + (f" with status {args.status}" if args.status else ""))
    else:
        print("\n\n".join(render(r) for r in records if isinstance(r, dict)))
    hidden = answer.get("hidden")
    if isinstance(hidden, int) and hidden:
        print(f"({hidden} more on points your grants do not cover)", file=sys.stderr)
    return EXIT_DONE


def cmd_proposal(args: argparse.Namespace) -> int:
    """Show one proposal; the exit code says its status."""
    status, answer = _client(args).request("GET", f"/proposals/{_quoted(args.id)}")
    record = _expect(status, answer, 200)
    _show(record, args.json)
    return exit_code(record)


def cmd_approve(args: argparse.Namespace) -> int:
    """Approve a waiting proposal; it is executed before the answer."""
    return _act(args, "approve", {"comment": args.comment}, by_status=True)


def cmd_reject(args: argparse.Namespace) -> int:
    """Reject a waiting proposal."""
    return _act(args, "reject", {"reason": args.reason}, by_status=False)


def cmd_rollback(args: argparse.Namespace) -> int:
    """Roll a succeeded change back."""
    return _act(args, "rollback", {"reason": args.reason}, by_status=False)


def _act(args: argparse.Namespace, action: str, body: dict[str, Any], *, by_status: bool) -> int:
    path = f"/proposals/{_quoted(args.id)}/{action}"
    status, answer = _client(args).request("POST", path, body)
    if status == 502:
        # The device refused the rollback: a failed write, not a failed command.
        error = answer.get("error") or "the device refused the write"
        print(f"opstwin: {_clean(error, 600)}", file=sys.stderr)
        return EXIT_REFUSED
    record = _expect(status, answer, 200)
    _show(record, args.json)
    return exit_code(record) if by_status else EXIT_DONE


# -- pure parts -----------------------------------------------------------------------------------


def exit_code(record: Mapping[str, Any]) -> int:
    """The exit code for a proposal's status (EXIT_CODES; 1 for one this CLI does not know)."""
    return EXIT_CODES.get(str(record.get("status")), EXIT_ERROR)


def gateway_url(url: str | None, http_host: str | None = None, http_port: int | None = None) -> str:
    """The gateway's base URL: `url` if given, else one from a config's http.host and port."""
    if url:
        url = url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")) or len(url.split("//", 1)[1]) == 0:
            raise ClientError(f"--url {url!r} is not an http:// or https:// URL")
        return url
    if http_host is None or http_port is None:
        raise ClientError(
            "say where the gateway is: --url http://HOST:PORT, or --config FILE (its http.host "
            "and http.port)"
        )
    if http_port == 0:
        raise ClientError(
            "the config's http.port is 0 (a free port chosen at start): pass --url with the "
            "port the gateway logged"
        )
    # A listener on every interface is reached on this machine's loopback.
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(http_host, http_host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{http_port}"


def authorization(
    token: str | None,
    user: str | None,
    env: Mapping[str, str],
    prompt: Callable[[str], str] | None,
) -> str:
    """The Authorization header for `--token` / OPSTWIN_TOKEN or `--user` and a password.

    `prompt` asks for the password when OPSTWIN_PASSWORD is not set (None: no terminal).
    """
    if token and user:
        raise ClientError("give --token or --user, not both")
    if user:
        password = env.get("OPSTWIN_PASSWORD")
        if password is None:
            if prompt is None:
                raise ClientError(
                    f"no password for user {user}: set OPSTWIN_PASSWORD (stdin is not a "
                    "terminal, so there is no prompt)"
                )
            password = prompt(f"password for {user}: ")
        pair = f"{user}:{password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")
    token = token or env.get("OPSTWIN_TOKEN")
    if token:
        return f"Bearer {token.strip()}"
    raise ClientError(
        "no credentials: set OPSTWIN_TOKEN (or pass --token) to an API token from `opstwin "
        "token create`, or pass --user NAME (password in OPSTWIN_PASSWORD or at the prompt)"
    )


def render(record: Mapping[str, Any]) -> str:
    """One proposal as a block of text for a terminal."""

    def field(name: str, value: Any) -> str:
        return f"  {name:<11} {_clean(value)}"

    status = str(record.get("status"))
    was = record.get("current_value")
    head = (
        f"{_clean(record.get('id'))}  {_clean(record.get('point'))} = "
        f"{_number_text(record.get('value'))}"
        + (f" (was {_number_text(was)})" if was is not None else "")
        + f"  {status.upper().replace('_', ' ')}"
    )
    lines = [head]
    proposer = record.get("proposer") or {}
    lines.append(
        field(
            "proposed",
            f"by {proposer.get('kind', '?')} {proposer.get('name', '?')} via "
            f"{record.get('source', '?')}, {_when(record.get('created_ts'))}",
        )
    )
    lines.append(field("reason", record.get("reason")))
    decision = record.get("decision")
    if decision is not None:
        confidence = record.get("confidence")
        shown = f", confidence {confidence:.3f}" if isinstance(confidence, int | float) else ""
        lines.append(field("decision", f"{decision}{shown}"))
    reasons = [r for r in record.get("reasons") or [] if isinstance(r, str)]
    for i, reason in enumerate(reasons):
        lines.append(field("reasons" if i == 0 else "", reason))
    simulation = _simulation(record)
    if simulation:
        lines.append(field("simulation", simulation))
    if status in ("pending_approval", "pending_analysis"):
        expires = record.get("expires_ts")
        until = f" before {_when(expires)}" if expires is not None else ""
        rid = _clean(record.get("id"))
        lines.append(field("next", f"opstwin approve {rid} (or reject {rid}){until}"))
    if record.get("approver"):
        verb = "approved by" if status not in ("rejected", "expired") else "decided by"
        lines.append(field("approver", f"{verb} {record.get('approver')}"))
    if record.get("read_back") is not None:
        lines.append(field("read back", _number_text(record.get("read_back"))))
    if record.get("error"):
        lines.append(field("error", record.get("error")))
    if record.get("restored"):
        lines.append(field("restored", record.get("restored")))
    return "\n".join(lines)


# -- HTTP -----------------------------------------------------------------------------------------


class GatewayClient:
    """Requests to one gateway with one Authorization header; JSON in and out."""

    def __init__(self, url: str, auth: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.url = url
        self._auth = auth
        self._timeout = timeout_s
        # No proxies: the gateway is on this machine or the plant network, and a proxy from the
        # environment would see the credentials.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Send one request; return (status, JSON object answered). ClientError if none came."""
        data = None if body is None else json.dumps(body).encode()
        headers = {
            "Authorization": self._auth,
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
        }
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                return response.status, _json_object(response.read(), self.url)
        except urllib.error.HTTPError as error:
            with error:
                return error.code, _json_object(error.read(), self.url, status=error.code)
        except urllib.error.URLError as exc:
            raise ClientError(
                f"cannot reach the gateway at {self.url}: is it running? ({exc.reason})"
            ) from None
        except TimeoutError:
            raise ClientError(
                f"the gateway at {self.url} did not answer within {self._timeout:g} s; "
                "`opstwin proposals` shows whether the proposal was made"
            ) from None
        except OSError as exc:
            raise ClientError(f"cannot talk to the gateway at {self.url}: {exc}") from None


def _json_object(raw: bytes, url: str, *, status: int | None = None) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        what = f"HTTP {status} and " if status else ""
        raise ClientError(
            f"{url} answered {what}no JSON object: is it an OpsTwin gateway's HTTP port?"
        )
    return data


def _expect(status: int, answer: dict[str, Any], wanted: int) -> dict[str, Any]:
    if status == wanted:
        return answer
    error = answer.get("error")
    raise ClientError(
        _clean(error, 600) if isinstance(error, str) else f"the gateway answered HTTP {status}"
    )


# -- helpers --------------------------------------------------------------------------------------


def _command(
    sub: Any, name: str, help: str, handler: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=help[:1].upper() + help[1:] + ".",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", "-c", default=None, help="site config YAML file")
    parser.add_argument("--url", default=None, help="gateway URL (overrides the config)")
    parser.add_argument("--token", default=None, help="API token (better: OPSTWIN_TOKEN)")
    parser.add_argument("--user", default=None, help="user name (password: OPSTWIN_PASSWORD)")
    parser.add_argument("--json", action="store_true", help="print the raw JSON record(s)")
    parser.add_argument(
        "--timeout", type=positive_arg, default=DEFAULT_TIMEOUT_S, help="seconds to wait (60)"
    )
    parser.set_defaults(handler=handler)

    # Exit 2 means "rejected" for these commands: a usage error must not look like one.
    def error(message: str) -> NoReturn:
        parser.print_usage(sys.stderr)
        parser.exit(EXIT_ERROR, f"{parser.prog}: error: {message}\n")

    setattr(parser, "error", error)  # noqa: B010 - replaces argparse's exit 2 on this parser
    return parser


def _client(args: argparse.Namespace) -> GatewayClient:
    host = port = None
    if not args.url and args.config:
        try:
            http = load_config(args.config).http
        except ConfigError as exc:
            raise ClientError(str(exc)) from None
        host, port = http.host, http.port
    url = gateway_url(args.url, host, port)
    prompt = getpass.getpass if sys.stdin.isatty() else None
    auth = authorization(args.token, args.user, os.environ, prompt)
    return GatewayClient(url, auth, timeout_s=args.timeout)


def _show(record: Mapping[str, Any], as_json: bool) -> None:
    print(json.dumps(record) if as_json else render(record))


def _simulation(record: Mapping[str, Any]) -> str:
    sim = record.get("simulation")
    if not isinstance(sim, dict):
        return ""
    if sim.get("error"):
        return f"failed: {sim['error']}"
    parts = [str(sim.get("model", "?"))]
    breakdown = record.get("confidence_breakdown") or {}
    p_sim = breakdown.get("p_sim") if isinstance(breakdown, dict) else None
    if isinstance(p_sim, int | float):
        parts.append(f"p {p_sim:.3f}")
    paths = sim.get("paths")
    if paths is not None:
        figures = f"{sim.get('paths_safe', '?')}/{paths} paths safe"
        if sim.get("paths_improved") is not None:
            figures += f", {sim['paths_improved']} improved"
        parts.append(figures)
    if sim.get("horizon_s") is not None:
        parts.append(f"horizon {_number_text(sim['horizon_s'])} s")
    judged = record.get("judged_by")
    if judged:
        parts.append(f"model of {judged}")
    return ", ".join(parts)


def _number_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return _clean(value, 64)


def _clean(value: Any, limit: int = 300) -> str:
    # The gateway quotes what clients sent (reasons, names): no terminal control sequences.
    return _printable(value, limit) if value is not None else "-"


def _quoted(proposal_id: str) -> str:
    return urllib.parse.quote(proposal_id, safe="")


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value

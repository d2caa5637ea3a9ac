"""Fuzzing every route of the REST API (issue 14): schemathesis generates valid and invalid requests from the
server's own OpenAPI document and sends them over HTTPS, with a session token, to a real running system that
is registered with a second system (so the remote-storage and remote-pair routes see a real remote, a real
Remote-Authorization token and a real TrueCopy pair).

For every request: no 5xx; every 4xx answer is in the array's error format (errorSource, messageId, message,
solution, solutionType, detailCode); and when the request was refused (a 4xx, or a job that Failed) the
configuration (every row of the system's config.sqlite3, read read-only) is exactly what it was before.

Budget: ``VSPEMU_FUZZ_EXAMPLES`` examples per operation and pass (default 8: a minute or two in CI);
set it higher to fuzz longer, e.g. ``VSPEMU_FUZZ_EXAMPLES=50 pytest tests/test_fuzz_api.py``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
import schemathesis
import urllib3
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from hypothesis.errors import FlakyStrategyDefinition
from schemathesis import GenerationMode

from vspemu.client import VspClient
from vspemu.lab import SystemProcess

EXAMPLES = int(os.environ.get("VSPEMU_FUZZ_EXAMPLES", "8"))
ERROR_KEYS = ("errorSource", "messageId", "message", "solution", "solutionType", "detailCode")
CG = "fz"
# invalid bodies only: link-test is a load generator by design (its valid bodies ask for up to 100000 echoes of
# 64 MiB), and a valid POST faults may be {"kind": "system-stop"}, which ends the server
INVALID_ONLY = {("POST", "/ConfigurationManager/vspemu/v1/link-test"),
                ("POST", "/ConfigurationManager/vspemu/v1/faults")}


@dataclass
class Target:
    p: SystemProcess
    s: SystemProcess
    pc: VspClient
    sc: VspClient
    known: dict[str, str]  # path parameter -> the id of an object that exists
    http: requests.Session = field(default_factory=requests.Session)
    problems: list[str] = field(default_factory=list)
    sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Session {self.pc.token}", "Remote-Authorization": f"Session {self.sc.token}",
                "Response-Job-Status": "Completed", "Response-Max-Wait": "5"}


def snapshot(system: SystemProcess) -> list[tuple[str, str, str]]:
    con = sqlite3.connect(f"file:{system.data_dir / 'config.sqlite3'}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute("SELECT kind, id, doc FROM objects ORDER BY kind, id").fetchall()
    finally:
        con.close()


def wait_job(t: Target, job: dict[str, Any], timeout: float = 120.0) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = t.http.get(f"{t.p.rest_url}/ConfigurationManager/v1/objects/jobs/{job.get('jobId')}",
                       headers=t.headers(), verify=False, timeout=60)
        if r.status_code != 200:
            return None
        if r.json().get("status") == "Completed":
            return r.json()  # type: ignore[no-any-return]
        time.sleep(0.1)
    return None


def settle(t: Target, timeout: float = 60.0) -> None:
    """Wait until no pair of the system is copying (the only configuration the system changes by itself)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        docs = [json.loads(doc) for kind, _, doc in snapshot(t.p) if kind == "pairs"]
        if not any("COPY" in (d.get("status"), d.get("peer_status")) for d in docs):
            return
        time.sleep(0.1)


# what the replication engine changes on its own: a copy finishing, a pair failing when its link went away
# (after an earlier, accepted change removed paths or took link ports offline)
PAIR_STATE_FIELDS = {"status", "peer_status", "copy_total", "copy_done", "fenced"}
ON_ITS_OWN = {("COPY", "PAIR"), ("PAIR", "PSUE"), ("COPY", "PSUE"), ("PAIR", "PFUS"), ("PAIR", "PFUL"),
              ("PFUL", "PAIR"), ("PFUL", "PSUE"), ("PFUL", "PFUS")}


def only_background(before: list[tuple[str, str, str]], after: list[tuple[str, str, str]]) -> bool:
    b, a = {(k, i): d for k, i, d in before}, {(k, i): d for k, i, d in after}
    if set(a) != set(b):
        return False
    for key in a:
        if a[key] == b[key]:
            continue
        if key[0] != "pairs":
            return False
        old, new = json.loads(b[key]), json.loads(a[key])
        if any(old.get(f) != new.get(f) for f in set(old) | set(new) if f not in PAIR_STATE_FIELDS):
            return False
        for f in ("status", "peer_status"):
            if old.get(f) != new.get(f) and (old.get(f), new.get(f)) not in ON_ITS_OWN:
                return False
    return True


def diff(before: list[tuple[str, str, str]], after: list[tuple[str, str, str]]) -> str:
    b, a = {(k, i): d for k, i, d in before}, {(k, i): d for k, i, d in after}
    changed = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key):
            continue
        try:
            old, new = json.loads(b.get(key) or "{}"), json.loads(a.get(key) or "{}")
            fields = {f: (old.get(f), new.get(f)) for f in set(old) | set(new) if old.get(f) != new.get(f)}
        except (ValueError, AttributeError):
            fields = {}
        changed.append(f"{key[0]}/{key[1]} {fields}")
    return "; ".join(changed[:10])


@pytest.fixture
def target(linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> Iterator[Target]:
    p, s, pc, sc = linked
    pv, sv = pc.create_ldev("4M"), sc.create_ldev("4M")
    pc.add_lun(pv)
    sc.add_lun(sv)
    body = {"copyGroupName": CG, "copyPairName": "p1", "replicationType": "TC",
            "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
            "isNewGroupCreation": True, "fenceLevel": "NEVER", "copyPace": 15}
    pc.invoke("POST", "remote-mirror-copypairs", body, remote=sc)
    jv = pc.create_ldev("16M")
    pc.create_journal(1, [jv])
    spare = pc.create_ldev("4M")
    lun = pc.get("luns")["data"][0]["lunId"]
    group = pc.get("remotepath-groups")["data"][0]["remotepathGroupId"]
    known = {
        "storageDeviceId": p.storage_device_id, "remoteStorageDeviceId": s.storage_device_id,
        "ldevId": str(spare), "poolId": "0", "portId": "CL1-A", "hostGroupId": "CL1-A,0", "lunId": lun,
        "journalId": "1", "jobId": "1", "sessionId": str(pc.session_id),
        "remotepathGroupId": group,
        "copyGroupId": f"{s.storage_device_id},{CG},{CG}P_,{CG}S_",
        "pairId": f"{s.storage_device_id},{CG},{CG}P_,{CG}S_,p1",
    }
    t = Target(p, s, pc, sc, known)
    t.http.verify = False
    urllib3.disable_warnings()
    yield t
    t.http.close()


def path_parameters(op: Any, known: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in {p.name for p in op.path_parameters}:
        if name == "groupId":
            out[name] = known["remotepathGroupId" if "remotepath-groups" in op.path else "copyGroupId"]
        elif name in known:
            out[name] = known[name]
    return out


def check(t: Target, op: Any, case: Any, extra_headers: dict[str, str] | None = None) -> None:
    before = snapshot(t.p)
    try:
        r = case.call(base_url=t.p.rest_url, session=t.http, headers={**t.headers(), **(extra_headers or {})},
                      timeout=60, verify=False)
    except UnicodeEncodeError:
        return  # a value the client cannot put into a URL or header: never reaches the server
    except requests.RequestException as e:  # a connection the server dropped counts as a failure
        t.problems.append(f"{op.method.upper()} {case.formatted_path}: {type(e).__name__}: {e}")
        return
    t.sent += 1
    t.statuses[r.status_code] = t.statuses.get(r.status_code, 0) + 1
    where = f"{op.method.upper()} {case.formatted_path} query={case.query} body={_short(case.body)}"
    if r.status_code >= 500:
        t.problems.append(f"{r.status_code} on {where}: {r.text[:300]}")
        return
    refused = 400 <= r.status_code < 500
    body: Any = None
    try:
        body = r.json()
    except ValueError:
        pass
    if r.status_code == 202 and isinstance(body, dict) and body.get("status") != "Completed":
        body = wait_job(t, body) or body  # a job still running: its outcome decides whether it was refused
    if refused:
        if not isinstance(body, dict) or any(k not in body for k in ERROR_KEYS) \
                or not str(body.get("messageId", "")).startswith("KART"):
            t.problems.append(f"{r.status_code} not in the array's error format on {where}: {r.text[:300]}")
    if r.status_code == 202 and isinstance(body, dict) and body.get("state") == "Failed":
        refused = True
        if any(k not in body.get("error", {}) for k in ERROR_KEYS):
            t.problems.append(f"failed job error not in the array's format on {where}: {body}")
    if not refused and op.method.upper() != "GET":
        settle(t)  # a copy the change started: let it finish, so it does not show as a later refusal's change
    if refused:
        after = snapshot(t.p)
        if after != before and not only_background(before, after):
            t.problems.append(f"refused ({r.status_code}) but the configuration changed on {where}: "
                              f"{diff(before, after)}")
    if r.status_code == 401 and isinstance(body, dict) and body.get("messageId") == "KART40048-E":
        probe = t.http.get(f"{t.p.rest_url}/ConfigurationManager/v1/objects/storages", headers=t.headers(),
                           verify=False, timeout=60)
        if probe.status_code == 401:
            t.pc.login()  # the fuzzer deleted our session (DELETE sessions/{id}): log in again


def _short(body: Any) -> str:
    try:
        text = json.dumps(body, default=str)
    except (TypeError, ValueError):
        text = repr(body)
    return text[:200]


FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
                         suppress_health_check=list(HealthCheck))

# values that broke the server before (issue 14) and their relatives: planted into valid requests
HOSTILE: list[Any] = [
    "\ud800", "a\udfffb", "\u00b2", "\u0663", "9" * 400, "1" + "0" * 30 + "G", "nan", "NaN", "inf", "-inf", "1e999",
    "-1", "", " ", "\x00", "a,b", "a/b", "../../x", "%2C", "x" * 5000, "CL1-A,\u00b2", "\u00b2,R9,0",
    10 ** 400, -(10 ** 30), 2 ** 63, 2 ** 64, -1, 1e308, 0.5, True, None, [], {}, [1] * 100, {"a": "b"},
    (256 << 40) // 512, 256 << 40,
]
HOSTILE_HEADERS: list[dict[str, str]] = [
    {}, {"Response-Max-Wait": "nan"}, {"Response-Max-Wait": "inf"}, {"Response-Max-Wait": "-1"},
    {"Response-Max-Wait": "1e999"}, {"Response-Max-Wait": "x"}, {"Response-Job-Status": "\u00e9"},
    {"Remote-Authorization": "Session"}, {"Remote-Authorization": "Basic eA=="}, {"Authorization": "Session"},
]


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [path] + [leaf for k, v in value.items() for leaf in _leaves(v, (*path, k))]
    if isinstance(value, list):
        return [path] + [leaf for i, v in enumerate(value) for leaf in _leaves(v, (*path, i))]
    return [path]


def _replace(root: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    node = root
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = new
    return root


def plant(case: Any, value: Any, pick: int) -> None:
    """Replace one value of a valid request (a body field, a query parameter or a path parameter)."""
    spots: list[tuple[str, tuple[Any, ...]]] = []
    if isinstance(case.body, (dict, list)):
        spots += [("body", p) for p in _leaves(case.body) if p]
    spots += [("query", (k,)) for k in (case.query or {})]
    spots += [("path", (k,)) for k in (case.path_parameters or {})]
    if not spots:
        return
    where, path = spots[pick % len(spots)]
    if where == "body":
        case.body = _replace(case.body, path, value)
    elif where == "query":
        case.query = {**case.query, path[0]: value if not isinstance(value, (dict, list)) else str(value)}
    else:
        case.path_parameters = {**case.path_parameters, path[0]: str(value)}


def run_operation(t: Target, op: Any, mode: GenerationMode, fixed: dict[str, str] | None) -> None:
    strategy = op.as_strategy(generation_mode=mode, path_parameters=fixed or None)

    @FUZZ_SETTINGS
    @given(case=strategy)
    def fuzz(case: Any) -> None:
        check(t, op, case)

    fuzz()


def run_hostile(t: Target, op: Any, fixed: dict[str, str] | None) -> None:
    """Valid requests with one value replaced by a hostile one, and sometimes a hostile header."""
    strategy = op.as_strategy(generation_mode=GenerationMode.POSITIVE, path_parameters=fixed or None)

    @FUZZ_SETTINGS
    @given(case=strategy, value=st.sampled_from(HOSTILE), pick=st.integers(0, 1000),
           headers=st.sampled_from(HOSTILE_HEADERS))
    def fuzz(case: Any, value: Any, pick: int, headers: dict[str, str]) -> None:
        plant(case, value, pick)
        check(t, op, case, headers)

    fuzz()


def operations(schema: Any) -> list[Any]:
    ops = [r.ok() for r in schema.get_all_operations()]
    # changes that remove objects last, so that the other operations meet the objects they name
    return sorted(ops, key=lambda op: (op.method.upper() == "DELETE", "/sessions" in op.path))


@pytest.mark.timeout(1200)  # about 150-300 s; a machine shared with other jobs has needed more
def test_fuzz_every_route(target: Target) -> None:
    t = target
    doc = httpx.get(f"{t.p.rest_url}/ConfigurationManager/openapi.json", verify=False).json()
    schema = schemathesis.openapi.from_dict(doc)
    ops = operations(schema)
    assert len(ops) > 100  # both path forms of every route
    start = time.monotonic()
    for op in ops:
        invalid_only = (op.method.upper(), op.path) in INVALID_ONLY
        passes: list[tuple[GenerationMode, dict[str, str] | None]] = [(GenerationMode.NEGATIVE, None)]
        if not invalid_only:
            passes += [(GenerationMode.POSITIVE, None), (GenerationMode.POSITIVE, path_parameters(op, t.known))]
        for mode, fixed in passes:
            for attempt in (1, 2):
                try:
                    run_operation(t, op, mode, fixed)
                except FlakyStrategyDefinition as e:  # the generator's own draws differed (schemathesis' strategy,
                    if attempt == 2:                  # not the server: check() never raises): generate once more
                        t.problems.append(f"{op.method.upper()} {op.path} ({mode.value}): twice {e!r}")
                    continue
                except Exception as e:  # a strategy that cannot generate (e.g. nothing negative to say)
                    if "Unsatisfiable" not in type(e).__name__ and "negative" not in str(e).lower():
                        t.problems.append(f"{op.method.upper()} {op.path} ({mode.value}): {type(e).__name__}: {e}")
                break
        if not invalid_only:
            run_hostile(t, op, path_parameters(op, t.known))
    seconds = time.monotonic() - start
    # the server is alive and the test's session still works
    assert httpx.get(f"{t.p.rest_url}/ConfigurationManager/configuration/version", verify=False).status_code == 200
    print(f"fuzz: {t.sent} requests on {len(ops)} operations in {seconds:.0f} s, statuses {sorted(t.statuses.items())}")
    assert not t.problems, f"{len(t.problems)} problems:\n" + "\n".join(t.problems[:60])




"""The pair state tables (vspemu.replication.states): every cell, against the checks the engine made before
they became data, and a few refusals through REST; the local copies' tables (Thin Image, ShadowImage) in the
same format, every cell against the transition dicts they had before."""

from __future__ import annotations

import itertools

import pytest

from vspemu.client import ApiError, VspClient
from vspemu.errors import VspError
from vspemu.lab import SystemProcess
from vspemu.localcopy import shadowimage_model, snapshot_states
from vspemu.replication import states
from vspemu.replication.model import ACTIVE, COPY, PSUS, SMPL, SSUS, SSWS, SUSPENDED, Pair
from vspemu.replication.states import NO_CHANGE, Refusal


def oracle(pair: Pair, op: str) -> str | tuple[str, str]:
    """The engine's status decisions as they were written before the tables (one pair): a new status,
    NO_CHANGE, or (message id, detail) of the refusal."""
    p = pair
    if op == states.SPLIT:
        if p.status == SMPL:
            return ("WRONG_STATE", f"pair {p.key} is SMPL")
        if p.status in ACTIVE:
            return PSUS if p.role == "P" else SSUS
        return NO_CHANGE
    if op == states.SPLIT_SSWS:
        if p.role != "S":
            return ("WRONG_STATE", "svolOperationMode SSWS must be issued to the storage system that holds the "
                                   "S-VOL")
        return SSWS
    if op == states.RESYNC_SWAP:
        running = p.role == "P" and p.status in ACTIVE and p.peer_status in ACTIVE and p.extra.get("swapped")
        if p.status not in SUSPENDED and not running:
            return ("WRONG_STATE", f"pair {p.key} is {p.status}; split it before a swap resync")
        return COPY
    if op == states.RESYNC:  # (a group that is not all active)
        if p.status == SSWS or p.peer_status == SSWS or p.swap_required:
            return ("WRONG_STATE", f"pair {p.key} was taken over by the S side (SSWS): resynchronize with "
                                   "doSwapSvol")
        if p.role != "P":
            return ("WRONG_STATE", "a resync must be issued to the storage system that holds the P-VOL (or use "
                                   "doSwapSvol to reverse the direction)")
        return COPY if p.status in SUSPENDED else NO_CHANGE
    if op == states.TAKEOVER:
        if p.role != "S" or p.status == SSWS:
            return NO_CHANGE
        return SSWS
    if op == states.DELETE:
        return SMPL
    raise AssertionError(op)


def make_pair(status: str, role: str, peer: str, swap_required: bool, swapped: bool) -> Pair:
    return Pair(group="g", name="p", role=role, local_ldev=1, remote_ldev=2, status=status, peer_status=peer,
                swap_required=swap_required, extra={"swapped": True} if swapped else {})


REMOTE_TABLES = {k: t for k, t in states.TABLES.items() if t.remote}


@pytest.mark.parametrize("table", list(REMOTE_TABLES.values()), ids=list(REMOTE_TABLES))
def test_every_cell_matches_the_engine_checks(table: states.StateTable) -> None:
    assert set(table.cells) == set(itertools.product(states.STATUSES, states.ROLES, states.OPERATIONS))
    seen_conditions: set[tuple[str, str]] = set()
    for status, role, op, peer, swap_required, swapped in itertools.product(
            states.STATUSES, states.ROLES, states.OPERATIONS, states.STATUSES, (False, True), (False, True)):
        pair = make_pair(status, role, peer, swap_required, swapped)
        want = oracle(pair, op)
        got = states.outcome(table, pair, op)
        if isinstance(got, Refusal):
            err = got.error(pair)
            assert isinstance(want, tuple), (status, role, op, peer, swap_required, swapped, err.fields)
            assert (err.key, err.fields.get("detail")) == want
        else:
            assert got == want, (status, role, op, peer, swap_required, swapped)
        seen_conditions.update((c, op) for c in states.conditions(pair) if (c, op) in table.conditions)
    assert seen_conditions == set(table.conditions)  # every condition row was reached too


def test_check_raises_the_first_refusal_and_changes_nothing() -> None:
    ok = make_pair(PSUS, "P", SSUS, False, False)
    bad = make_pair(SSUS, "S", PSUS, False, False)
    with pytest.raises(VspError) as e:
        states.check(states.TRUECOPY, [ok, bad], states.RESYNC)
    assert e.value.key == "WRONG_STATE" and "holds the P-VOL" in e.value.fields["detail"]
    assert (ok.status, bad.status) == (PSUS, SSUS)
    assert states.check(states.TRUECOPY, [ok], states.RESYNC) == [COPY]


@pytest.mark.parametrize("own", sorted(states.STATUSES))
@pytest.mark.parametrize("role", states.ROLES)
@pytest.mark.parametrize("peer", sorted(states.STATUSES))
def test_peer_events_match_the_engine(own: str, role: str, peer: str) -> None:
    pair = make_pair(own, role, SMPL if peer != SMPL else COPY, False, False)
    want = own
    if peer in (SMPL, SSWS) and role == "P" and own in ACTIVE:
        want = PSUS
    if role == "S" and own in ACTIVE and peer in ("PSUS", "PSUE", "PFUS"):
        want = SSUS if peer == "PSUS" else peer
    assert states.on_peer_status(pair, peer) == want


@pytest.mark.e2e
def test_rest_refusals_come_out_as_before(linked: tuple[SystemProcess, SystemProcess, VspClient, VspClient]) -> None:
    """A few refusals through REST: same HTTP status, message id and text as before the tables."""
    p, s, pc, sc = linked
    pv, sv = pc.create_ldev("16M"), sc.create_ldev("16M")
    pc.invoke("POST", "remote-mirror-copypairs", {
        "copyGroupName": "stg", "copyPairName": "p1", "replicationType": "TC",
        "remoteStorageDeviceId": s.storage_device_id, "pvolLdevId": pv, "svolLdevId": sv,
        "isNewGroupCreation": True, "fenceLevel": "NEVER", "copyPace": 15}, remote=sc)
    pid = f"{s.storage_device_id},stg,stgP_,stgS_,p1"
    sid = f"{p.storage_device_id},stg,stgS_,stgP_,p1"

    def refused(client: VspClient, path: str, params: dict[str, object], other: VspClient) -> ApiError:
        with pytest.raises(ApiError) as e:
            client.invoke("PUT", path, {"parameters": {"replicationType": "TC", **params}}, remote=other)
        return e.value

    # a swap split belongs to the S side
    e = refused(pc, f"remote-mirror-copypairs/{pid}/actions/split/invoke", {"svolOperationMode": "SSWS"}, sc)
    assert (e.status, e.message_id) == (412, "KART40062-E")
    assert "svolOperationMode SSWS must be issued to the storage system that holds the S-VOL" in e.message
    # a swap resync of a pair in PAIR
    e = refused(pc, f"remote-mirror-copypairs/{pid}/actions/resync/invoke", {"doSwapSvol": True}, sc)
    assert (e.status, e.message_id) == (412, "KART40062-E")
    assert "is PAIR; split it before a swap resync" in e.message
    # a resync from the S side of a split pair
    pc.invoke("PUT", f"remote-mirror-copypairs/{pid}/actions/split/invoke",
              {"parameters": {"replicationType": "TC"}}, remote=sc)
    e = refused(sc, f"remote-mirror-copypairs/{sid}/actions/resync/invoke", {}, pc)
    assert (e.status, e.message_id) == (412, "KART40062-E")
    assert "a resync must be issued to the storage system that holds the P-VOL" in e.message
    # a split of a split pair: accepted, no change
    pc.invoke("PUT", f"remote-mirror-copypairs/{pid}/actions/split/invoke",
              {"parameters": {"replicationType": "TC"}}, remote=sc)
    info = pc.get(f"remote-mirror-copypairs/{pid}", remote=sc)
    assert (info["pvolStatus"], info["svolStatus"]) == ("PSUS", "SSUS")


# -- local copies ---------------------------------------------------------------------------------------------
# the transition dicts of vspemu.localcopy before their tables moved into the shared format (the oracle)
_TI_NOT_SPLIT, _TI_BUSY = "!the snapshot is not split (PSUS)", "!the snapshot is being copied"
TI_BEFORE: dict[tuple[str, str], str] = {
    ("PAIR", "split"): "PSUS", ("PSUS", "split"): "!the snapshot is already split", ("PSUE", "split"): _TI_NOT_SPLIT,
    ("COPY", "split"): _TI_BUSY, ("RCPY", "split"): _TI_BUSY,
    ("PAIR", "resync"): "PAIR", ("PSUS", "resync"): "PAIR", ("PSUE", "resync"): "PAIR", ("COPY", "resync"): _TI_BUSY,
    ("RCPY", "resync"): _TI_BUSY,
    ("PSUS", "restore"): "RCPY", ("PAIR", "restore"): _TI_NOT_SPLIT,
    ("PSUE", "restore"): "!the snapshot data is lost (PSUE)", ("COPY", "restore"): _TI_BUSY,
    ("RCPY", "restore"): _TI_BUSY,
    ("RCPY", "restored"): "PAIR",
    ("PAIR", "delete"): "", ("PSUS", "delete"): "", ("PSUE", "delete"): "", ("COPY", "delete"): _TI_BUSY,
    ("RCPY", "delete"): "!the snapshot is being restored",
    ("PAIR", "assign-volume"): "PAIR", ("PSUS", "assign-volume"): "PSUS", ("PSUE", "assign-volume"): "PSUE",
    ("COPY", "assign-volume"): _TI_BUSY, ("RCPY", "assign-volume"): _TI_BUSY,
    ("PAIR", "unassign-volume"): "PAIR", ("PSUS", "unassign-volume"): "PSUS", ("PSUE", "unassign-volume"): "PSUE",
    ("COPY", "unassign-volume"): _TI_BUSY, ("RCPY", "unassign-volume"): _TI_BUSY,
    ("PSUS", "clone"): "COPY", ("PAIR", "clone"): _TI_NOT_SPLIT, ("PSUE", "clone"): _TI_NOT_SPLIT,
    ("COPY", "clone"): _TI_BUSY, ("RCPY", "clone"): _TI_BUSY,
    ("COPY", "cloned"): "",
    ("PSUS", "fail"): "PSUE", ("RCPY", "fail"): "PSUE", ("COPY", "fail"): "PSUE", ("PSUE", "fail"): "PSUE",
}
_SI_RESTORING, _SI_PSUE = "!a reverse resync (restore) is under way", \
    "!the pair is suspended by an error (PSUE); resync it first"
SI_BEFORE: dict[tuple[str, str], str] = {
    ("COPY", "split"): "PSUS", ("PAIR", "split"): "PSUS", ("PSUS", "split"): "!the pair is split already",
    ("RCPY", "split"): _SI_RESTORING, ("PSUE", "split"): _SI_PSUE,
    ("COPY", "resync"): "!a copy is under way", ("PAIR", "resync"): "!the pair is in PAIR already",
    ("PSUS", "resync"): "COPY", ("RCPY", "resync"): _SI_RESTORING, ("PSUE", "resync"): "COPY",
    ("COPY", "restore"): "!a copy is under way; split the pair first",
    ("PAIR", "restore"): "!the pair is in PAIR; split it first", ("PSUS", "restore"): "RCPY",
    ("RCPY", "restore"): _SI_RESTORING, ("PSUE", "restore"): _SI_PSUE,
    ("COPY", "delete"): "SMPL", ("PAIR", "delete"): "SMPL", ("PSUS", "delete"): "SMPL",
    ("RCPY", "delete"): _SI_RESTORING, ("PSUE", "delete"): "SMPL",
}


def test_local_copies_register_their_tables_in_the_shared_format() -> None:
    assert states.TABLES["TI"] is snapshot_states.THIN_IMAGE
    assert states.TABLES["SI"] is shadowimage_model.SHADOWIMAGE
    for table in states.TABLES.values():
        assert isinstance(table, states.StateTable)
        assert set(table.cells) <= set(itertools.product(table.statuses, table.roles, table.operations))
        assert table.remote == (table.roles == states.ROLES)
        assert table.default is not None or set(table.cells) == set(
            itertools.product(table.statuses, table.roles, table.operations))
    assert {t.replication_type for t in states.TABLES.values() if not t.remote} >= {"TI", "SI"}


@pytest.mark.parametrize("op", [*snapshot_states.OPERATIONS, "bogus"])
@pytest.mark.parametrize("status", [*snapshot_states.STATUSES, "SMPL"])
def test_thin_image_cells_answer_as_before(status: str, op: str) -> None:
    before = TI_BEFORE.get((status, op), f"!{op} is not possible in status {status}")
    if not before.startswith("!"):
        assert snapshot_states.next_status(status, op) == before
        return
    with pytest.raises(VspError) as e:
        snapshot_states.next_status(status, op)
    assert (e.value.key, e.value.fields["detail"]) == (
        "WRONG_STATE", f"{before[1:]} (status {status}, operation {op})")


@pytest.mark.parametrize("op", [*shadowimage_model.OPERATIONS, "bogus"])
@pytest.mark.parametrize("status", [*shadowimage_model.STATUSES, "SMPL"])
def test_shadowimage_cells_answer_as_before(status: str, op: str) -> None:
    before = SI_BEFORE.get((status, op), f"!{op} is not an operation in status {status}")
    if not before.startswith("!"):
        assert shadowimage_model.check_transition("g,p,s,n", status, op) == before
        return
    with pytest.raises(VspError) as e:
        shadowimage_model.check_transition("g,p,s,n", status, op)
    assert (e.value.key, e.value.fields["detail"]) == (
        "WRONG_STATE", f"{op} of ShadowImage pair g,p,s,n: {before[1:]}")

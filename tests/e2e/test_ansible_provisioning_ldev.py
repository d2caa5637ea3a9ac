"""The real Ansible collection provisions LDEVs, pools and users on one vspemu system (issue 16).

Reuses tests/e2e/test_ansible.py's cached venv and lab machinery; the playbooks live in tests/ansible/.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from test_ansible import PASSWORD, AnsibleLab, single_system_lab

from vspemu.client import ApiError, VspClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def plab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnsibleLab]:
    yield from single_system_lab(tmp_path_factory, 410011)


def test_ldev_lifecycle_and_facts(plab: AnsibleLab) -> None:
    before = {x["ldevId"] for x in plab.pc.get("ldevs", ldevOption="defined")["data"]}
    plab.play("ldev.yml", ldev_id=100)
    after = {x["ldevId"] for x in plab.pc.get("ldevs", ldevOption="defined")["data"]}
    assert after == before


def test_storage_pool_lifecycle(plab: AnsibleLab) -> None:
    plab.play("pool.yml", pool_id=12, vol_a=201, vol_b=202, dp_vol=203)
    assert [p["poolId"] for p in plab.pc.get("pools")["data"]] == [0]
    defined = {x["ldevId"] for x in plab.pc.get("ldevs", ldevOption="defined")["data"]}
    assert not defined & {201, 202, 203}


def test_sample_provision_ldev_to_host(plab: AnsibleLab) -> None:
    """The collection's sample provision_ldev_to_host.yml: an LDEV in a DP pool, presented to a host group."""
    vols = [plab.pc.create_ldev("1G", ldev_id=i) for i in (401, 402)]
    plab.pc.invoke("POST", "pools", {"poolId": 15, "poolName": "sample_pool", "poolType": "DP", "ldevIds": vols})
    plab.play("provision_ldev_to_host.yml")
    made = plab.pc.get("ldevs", poolId=15, ldevOption="dpVolume")["data"]
    assert [(x["label"], x["dataReductionMode"], x["blockCapacity"]) for x in made] == [
        ("database_volume1", "compression_deduplication", 2097152)]
    groups = [g for g in plab.pc.get("host-groups", portId="CL1-A")["data"]
              if g["hostGroupName"] == "hostgroup-server1"]
    assert len(groups) == 1
    luns = plab.pc.get("luns", portId="CL1-A", hostGroupNumber=groups[0]["hostGroupNumber"])["data"]
    assert [x["ldevId"] for x in luns] == [made[0]["ldevId"]]


def test_users_and_factory_password(plab: AnsibleLab) -> None:
    """Last (it changes the factory password): hv_user manages an account and the factory password."""
    new = "Lab-pass-42"
    plab.play("users.yml", new_password=new)
    assert [u["userId"] for u in plab.pc.get("users")["data"]] == ["maintenance"]
    with pytest.raises(ApiError):
        VspClient(plab.p.rest_url, verify=str(plab.p.cert_path), password=PASSWORD)
    plab.p.password = new
    plab.p.restart()  # the changed password survives a restart
    with plab.p.client() as c:
        assert c.get("users/maintenance")["isBuiltIn"]

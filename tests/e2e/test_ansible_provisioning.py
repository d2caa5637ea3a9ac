"""Host-side provisioning with the real Ansible collection (hv_hg, hv_hg_facts, hv_iscsi_target), unchanged.

The playbooks are tests/ansible/hg.yml, hg_delete.yml and iscsi_target.yml; the venv and the playbook runner are
tests/e2e/test_ansible.py's (``.venv-ansible``). After each play the test checks the storage system through its
REST API.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from test_ansible import AnsibleLab, single_system_lab  # tests/e2e is on sys.path (pytest rootdir-less import)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def plab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnsibleLab]:
    yield from single_system_lab(tmp_path_factory, 420001)


def test_hv_hg_lifecycle(plab: AnsibleLab) -> None:
    api = plab.pc
    a, b, c = (api.create_ldev("16M") for _ in range(3))
    facts_file = plab.scratch / "hg_facts.json"
    plab.play("hg.yml", hg_name="esx_cluster1", hg_port="CL1-A", ldev_a=a, ldev_b=b, ldev_c=c,
              facts_file=str(facts_file))
    groups = {h["hostGroupName"]: h for h in api.get("host-groups", portId="CL1-A")["data"]}
    hg = groups["esx_cluster1"]
    number = hg["hostGroupNumber"]
    assert number != 0
    # set_host_mode_and_hmo adds options to those already set (the collection sends the union)
    assert (hg["hostMode"], hg["hostModeOptions"]) == ("LINUX/IRIX", [40, 54, 63])
    wwns = {w["hostWwn"]: w["wwnNickname"]
            for w in api.get("host-wwns", portId="CL1-A", hostGroupNumber=number)["data"]}
    assert wwns == {"100000109b583b2d": "esx1_hba0", "200000109b3c0fd3": "esx2_hba0"}
    mapped = sorted(x["ldevId"] for x in api.get("luns", portId="CL1-A", hostGroupNumber=number)["data"])
    assert mapped == sorted([b, c])
    facts = json.loads(facts_file.read_text())
    assert "esx_cluster1" in json.dumps(facts)

    plab.play("hg_delete.yml", hg_name="esx_cluster1", hg_port="CL1-A", ldevs=[b, c])
    assert "esx_cluster1" not in {h["hostGroupName"] for h in api.get("host-groups", portId="CL1-A")["data"]}
    assert api.get("luns", portId="CL1-A", hostGroupNumber=number)["data"] == []
    assert api.get("host-wwns", portId="CL1-A", hostGroupNumber=0)["data"] == []


def test_hv_iscsi_target_lifecycle(plab: AnsibleLab) -> None:
    api = plab.pc
    a, b = (api.create_ldev("16M") for _ in range(2))
    facts_file = plab.scratch / "iscsi_facts.json"
    plab.play("iscsi_target.yml", target_name="iscsi_srv1", hg_port="CL5-A", ldev_a=a, ldev_b=b,
              facts_file=str(facts_file))
    # the target as the play left it before detaching and deleting (the module's own report of it)
    tgt = json.loads(facts_file.read_text())["iscsi_target"]
    assert tgt["iqn"].startswith("iqn.")
    assert sorted(i["iqn"] for i in tgt["iqn_initiators"]) == [
        "iqn.1993-08.org.debian.iscsi:01:107dc7e4254a", "iqn.1993-08.org.debian.iscsi:01:107dc7e4254b"]
    assert tgt["chap_users"] == ["user2"]
    assert sorted(x["logical_unit_id"] for x in tgt["logical_units"]) == sorted([a, b])
    assert [o["raid_option_number"] for o in tgt["host_mode"]["host_mode_options"]] == [54, 63]
    # and after the play: the target, its initiators, CHAP users and LU paths are gone
    assert [h["hostGroupNumber"] for h in api.get("host-groups", portId="CL5-A")["data"]] == [0]
    assert api.get("host-iscsis", portId="CL5-A")["data"] == []
    assert api.get("chap-users", portId="CL5-A")["data"] == []
    assert api.get("luns", portId="CL5-A")["data"] == []

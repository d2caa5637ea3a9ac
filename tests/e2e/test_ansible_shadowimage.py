"""The real Ansible module hv_shadow_image_pair (hitachivantara.vspone_block) against one vspemu system.

Uses the cached collection venv and the one-system lab of test_ansible.py. The playbook (tests/ansible/
shadow_image.yml) asserts what each task reports; the test checks the data over NBD afterwards: the S-VOL
was a full copy of the P-VOL, and after the restore the P-VOL holds the S-VOL's bytes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from test_ansible import AnsibleLab, single_system_lab  # tests/e2e is on sys.path (pytest rootdir-less import)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnsibleLab]:
    yield from single_system_lab(tmp_path_factory, 410021)


def test_shadow_image_pair_lifecycle(lab: AnsibleLab) -> None:
    pv, sv = lab.volumes()
    lab.play("shadow_image.yml", pvol=pv, svol=sv, cg="SIG", cp="SIP")
    assert lab.digest("p", pv) == lab.digest("s", sv)  # PAIR after the restore: both hold the same bytes
    assert lab.pc.get("local-clone-copypairs")["data"] == []

# ruff: noqa: E402  (cinder.objects must be registered before the driver modules are imported)
"""Drive the real Cinder Hitachi driver (cinder.volume.drivers.hitachi, REST backend) against a vspemu system.

Run with the python of a venv that has ``cinder`` installed (tests/e2e/test_cinder.py builds it). Reads a
first line of JSON on stdin::

    {"mode": "fc" | "iscsi", "san_ip": ..., "san_api_port": ..., "user": ..., "password": ...,
     "storage_id": "900000012345", "pool": "0", "ports": ["CL1-A"], "size_gib": 1,
     "connector": {...}, "local_connector": {...}}

then one step a line (do_setup, get_volume_stats, create_volume, extend_volume, initialize_connection,
terminate_connection, delete_volume; create_snapshot, create_volume_from_snapshot, create_cloned_volume,
revert_to_snapshot, delete_snapshot; ``delete_volume NAME`` deletes the volume made by the step NAME, e.g.
``delete_volume create_cloned_volume``), and answers each with one JSON line: {"step": name, "ok": true,
"result": ...} or {"step": name, "ok": false, "error": ..., "traceback": ...}, so the test can look at the
storage system between steps. It ends at end of input. No OpenStack service runs: the driver gets a
Configuration object whose oslo.config options are set here, and volume objects made here. Nothing of vspemu
is mocked; what is given instead of OpenStack is the Cinder node's own connector (os-brick would look at
this machine's HBAs) and an empty volume type (Cinder would read it from its database).
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback
import uuid
import warnings
from typing import Any

warnings.simplefilter("ignore")

from cinder import objects

objects.register_all()  # before the driver modules: they import object classes by name

from cinder import (
    context as cinder_context,
    coordination,
)
from cinder.volume import (
    configuration as conf,
    volume_types,
    volume_utils,
)
from cinder.volume.drivers.hitachi import (
    hbsd_common,
    hbsd_fc,
    hbsd_iscsi,
    hbsd_replication,
    hbsd_rest,
    hbsd_rest_fc,
)
from oslo_config import cfg

GROUP = conf.SHARED_CONF_GROUP


def configure(args: dict[str, Any]) -> conf.Configuration:
    lock_dir = tempfile.mkdtemp(prefix="cinder-locks-")
    cfg.CONF([], project="cinder", default_config_files=[])
    cfg.CONF.set_override("lock_path", lock_dir, group="oslo_concurrency")
    cfg.CONF.set_override("backend_url", f"file://{lock_dir}", group="coordination")
    configuration = conf.Configuration(
        hbsd_rest.REST_VOLUME_OPTS + hbsd_rest.REST_PAIR_OPTS + hbsd_common.COMMON_VOLUME_OPTS
        + hbsd_common.COMMON_PORT_OPTS + hbsd_common.COMMON_PAIR_OPTS + hbsd_common.COMMON_NAME_OPTS
        + hbsd_common.COMMON_EXTEND_OPTS + hbsd_replication._REP_OPTS
        + hbsd_replication.COMMON_REPLICATION_OPTS + hbsd_replication.COMMON_MIRROR_OPTS
        + hbsd_replication.ISCSI_MIRROR_OPTS + hbsd_replication.REST_MIRROR_OPTS
        + hbsd_replication.REST_MIRROR_API_OPTS + hbsd_replication.REST_MIRROR_SSL_OPTS
        + hbsd_rest_fc.FC_VOLUME_OPTS, GROUP)
    backend = "RESTFC" if args["mode"] == "fc" else "RESTISCSI"
    driver_cls = "hbsd_fc.HBSDFCDriver" if args["mode"] == "fc" else "hbsd_iscsi.HBSDISCSIDriver"
    values: dict[str, Any] = {
        "volume_backend_name": backend,
        "volume_driver": f"cinder.volume.drivers.hitachi.{driver_cls}",
        "driver_ssl_cert_verify": False,
        "hitachi_storage_id": args["storage_id"],
        "hitachi_pools": [args["pool"]],
        "hitachi_target_ports": args["ports"],
        "hitachi_compute_target_ports": args["ports"],
        "hitachi_group_create": True,
        "hitachi_group_delete": True,
        "hitachi_ldev_range": args.get("ldev_range"),
        "san_login": args["user"],
        "san_password": args["password"],
        "san_ip": args["san_ip"],
        "san_api_port": args["san_api_port"],
        "san_thin_provision": True,
        "use_multipath_for_image_xfer": False,
        "enforce_multipath_for_image_xfer": False,
        "use_chap_auth": False,
        "hitachi_lun_timeout": 5,
        "hitachi_rest_timeout": 60,
        "hitachi_exec_retry_interval": 1,
        "hitachi_lock_timeout": 10,
    }
    for name, value in values.items():
        if value is not None:
            cfg.CONF.set_override(name, value, group=GROUP)
    return configuration


VOLUME_TYPE_ID = "5f6d0b0e-0000-4000-8000-000000000001"


def no_database() -> None:
    """Volume types live in Cinder's database; there is none here: the one type has no QoS and no specs."""
    volume_types.get_volume_type_qos_specs = lambda type_id: {"qos_specs": None}
    volume_types.get_volume_type_extra_specs = lambda type_id, key=False: {}


def make_volume(size: int) -> Any:
    ctxt = cinder_context.get_admin_context()
    vid = str(uuid.uuid4())
    vtype = objects.VolumeType(ctxt, id=VOLUME_TYPE_ID, name="vspemu", extra_specs={}, qos_specs_id=None)
    vol = objects.Volume(ctxt, id=vid, _name_id=None, size=size, provider_location=None,
                         volume_type_id=None, volume_type=vtype, metadata={}, admin_metadata={}, glance_metadata={},
                         status="creating", display_name="vspemu-test", host="localhost@RESTFC#pool",
                         multiattach=False, volume_attachment=objects.VolumeAttachmentList(objects=[]))
    return vol


def make_snapshot(vol: Any) -> Any:
    ctxt = cinder_context.get_admin_context()
    return objects.Snapshot(ctxt, id=str(uuid.uuid4()), volume=vol, volume_id=vol.id, volume_size=vol.size,
                            provider_location=None, metadata={}, status="creating", display_name="vspemu-snap",
                            volume_type_id=None)


def main() -> int:
    args = json.loads(sys.stdin.readline())
    configuration = configure(args)
    local = args["local_connector"]
    volume_utils.brick_get_connector_properties = lambda *a, **k: dict(local)  # the Cinder node itself
    no_database()
    coordination.COORDINATOR.start()
    driver_cls = hbsd_fc.HBSDFCDriver if args["mode"] == "fc" else hbsd_iscsi.HBSDISCSIDriver
    driver = driver_cls(configuration=configuration)
    vol: Any = None
    snap: Any = None
    state: dict[str, Any] = {}
    made: dict[str, Any] = {}  # step name -> the volume it made (create_volume_from_snapshot, ...)

    def new_volume(step_name: str, model: dict[str, Any]) -> dict[str, Any]:
        new = made[step_name]
        new.provider_location = model["provider_location"]
        return {"ldev": int(new.provider_location), "model": model}

    def step(line: str) -> Any:
        nonlocal vol, snap
        name, _, arg = line.partition(" ")
        if name == "do_setup":
            driver.do_setup(None)
            driver.check_for_setup_error()
            return {"storage_info": {k: v for k, v in driver.common.storage_info.items()
                                     if isinstance(v, (str, int, list, dict))}}
        if name == "create_volume":
            vol = make_volume(args.get("size_gib", 1))
            model = driver.create_volume(vol)
            vol.provider_location = model["provider_location"]
            state["ldev"] = int(vol.provider_location)
            return {"ldev": state["ldev"], "model": model}
        if name == "extend_volume":
            driver.extend_volume(vol, args.get("size_gib", 1) + 1)
            vol.size = args.get("size_gib", 1) + 1
            return {"ldev": state["ldev"]}
        if name == "initialize_connection":
            info = driver.initialize_connection(vol, args["connector"])
            return info
        if name == "terminate_connection":
            return driver.terminate_connection(vol, args["connector"])
        if name == "delete_volume" and arg:
            driver.delete_volume(made[arg])
            return {"ldev": int(made[arg].provider_location)}
        if name == "delete_volume":
            driver.delete_volume(vol)
            return {"ldev": state["ldev"]}
        if name == "create_snapshot":
            snap = make_snapshot(vol)
            model = driver.create_snapshot(snap)
            snap.provider_location = model["provider_location"]
            return {"ldev": int(snap.provider_location), "model": model, "id": snap.id}
        if name == "create_volume_from_snapshot":
            made[name] = make_volume(vol.size)
            return new_volume(name, driver.create_volume_from_snapshot(made[name], snap))
        if name == "create_cloned_volume":
            made[name] = make_volume(vol.size)
            return new_volume(name, driver.create_cloned_volume(made[name], vol))
        if name == "revert_to_snapshot":
            return driver.revert_to_snapshot(None, vol, snap)
        if name == "delete_snapshot":
            return driver.delete_snapshot(snap)
        if name == "get_volume_stats":
            return driver.get_volume_stats(refresh=True)
        raise ValueError(name)

    try:
        for line in sys.stdin:
            name = line.strip()
            if not name:
                continue
            try:
                reply: dict[str, Any] = {"step": name, "ok": True, "result": step(name)}
            except BaseException as e:  # noqa: BLE001 - reported to the test, which decides
                reply = {"step": name, "ok": False, "error": f"{type(e).__name__}: {e}",
                         "traceback": traceback.format_exc()}
            print(json.dumps(reply, default=str), flush=True)
    finally:
        try:
            driver.common.client.keep_session_loop.stop()
        except Exception:  # noqa: BLE001, S110 - the driver may not have got that far
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

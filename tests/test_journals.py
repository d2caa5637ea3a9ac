"""Journals: create, list (basic / detail), GET one, patch, expand, shrink, MP blade, delete, refusals."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from vspemu.client import ApiError, VspClient
from vspemu.lab import SystemProcess


def post(c: VspClient, path: str, body: Any, method: str = "POST") -> httpx.Response:
    return c.raw(method, f"v1/objects/{path}", json=body, headers=c.headers())


def assert_error(r: httpx.Response, status: int, message_id: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["messageId"] == message_id, r.json()


def job_error(c: VspClient, method: str, path: str, body: Any = None) -> ApiError:
    with pytest.raises(ApiError) as e:
        c.invoke(method, path, body)
    return e.value


def test_journal_lifecycle(system: SystemProcess, api: VspClient) -> None:
    v1, v2, v3 = (api.create_ldev("64M") for _ in range(3))
    assert api.get("journals")["data"] == []
    assert api.create_journal(3, [v1]) == 3
    basic = api.get("journals", journalInfo="basic")["data"]
    assert basic == [{"journalId": 3, "muNumber": 0, "consistencyGroupId": 0, "journalStatus": "SMPL",
                      "numOfActivePaths": 0, "usageRate": 0, "qMarker": "00000000", "qCount": 0,
                      "byteFormatCapacity": "64.00 M", "blockCapacity": 131072, "numOfLdevs": 1,
                      "firstLdevId": v1}]
    assert api.get("journals")["data"] == basic  # basic is the default
    detail = api.get("journals", journalInfo="detail")["data"][0]
    assert detail["journalId"] == 3 and detail["isMainframe"] is False and detail["copySpeed"] == 256
    assert [m["muNumber"] for m in detail["mirrorUnits"]] == [0, 1, 2, 3]
    assert all(m["journalStatus"] == "SMPL" and m["copyPace"] == "L" for m in detail["mirrorUnits"])
    assert {"isCacheModeEnabled", "isInflowControlEnabled", "dataOverflowWatchInSeconds", "isDataCopying",
            "mpBladeId"} <= set(detail)
    one = api.get("journals/3")
    assert one["firstLdevId"] == v1 and one["mirrorUnits"] and one["journalStatus"] == "SMPL"
    # the LDEV is now a journal volume
    assert "JNL" in api.get(f"ldevs/{v1}")["attributes"]
    assert [x["ldevId"] for x in api.get("ldevs", journalId=3)["data"]] == [v1]
    # patch (PATCH and PUT)
    api.invoke("PATCH", "journals/3", {"dataOverflowWatchInSeconds": 120, "isCacheModeEnabled": False,
                                       "copySpeed": 100, "mirrorUnit": {"muNumber": 1, "copyPace": "H",
                                                                        "pathBlockadeWatchInMinutes": 10}})
    api.invoke("PUT", "journals/3", {"isInflowControlEnabled": True})
    d = api.get("journals/3")
    assert (d["dataOverflowWatchInSeconds"], d["isCacheModeEnabled"], d["copySpeed"], d["isInflowControlEnabled"]) \
        == (120, False, 100, True)
    assert d["mirrorUnits"][1]["copyPace"] == "H" and d["mirrorUnits"][1]["pathBlockadeWatchInMinutes"] == 10
    assert d["mirrorUnits"][0]["copyPace"] == "L"
    # expand / shrink
    api.invoke("POST", "journals/3/actions/expand/invoke", {"parameters": {"ldevIds": [v2]}})
    b = api.get("journals/3")
    assert b["numOfLdevs"] == 2 and b["blockCapacity"] == 2 * 131072
    assert sorted(x["ldevId"] for x in api.get("ldevs", journalId=3)["data"]) == sorted([v1, v2])
    e = job_error(api, "POST", "journals/3/actions/expand/invoke", {"parameters": {"ldevIds": [v3]}})
    assert e.message_id == "KART40103-E"  # at most two journal volumes
    api.invoke("PUT", "journals/3/actions/shrink/invoke", {"parameters": {"ldevIds": [v1]}})
    assert api.get("journals/3")["firstLdevId"] == v2
    assert "JNL" not in api.get(f"ldevs/{v1}")["attributes"]
    e = job_error(api, "POST", "journals/3/actions/shrink/invoke", {"parameters": {"ldevIds": [v2]}})
    assert e.message_id == "KART40062-E"  # the last volume
    e = job_error(api, "POST", "journals/3/actions/shrink/invoke", {"parameters": {"ldevIds": [v3]}})
    assert e.message_id == "KART40039-E"  # not in the journal
    api.invoke("POST", "journals/3/actions/assign-mp-blade/invoke", {"parameters": {"mpBladeId": 2}})
    assert api.get("journals/3")["mpBladeId"] == 2
    # persistence
    system.restart()
    with system.client() as c:
        assert c.get("journals/3")["dataOverflowWatchInSeconds"] == 120
        assert c.get("journals/3")["mirrorUnits"][1]["copyPace"] == "H"
        c.delete_journal(3)
        assert c.get("journals")["data"] == []
        assert "JNL" not in c.get(f"ldevs/{v2}")["attributes"]
        c.delete_ldev(v2)  # an ordinary LDEV again
        with pytest.raises(ApiError) as err:
            c.get("journals/3")
        assert err.value.status == 404


def test_journal_volume_guards(api: VspClient) -> None:
    v1, v2 = api.create_ldev("64M"), api.create_ldev("64M")
    api.create_journal(0, [v1])
    e = job_error(api, "DELETE", f"ldevs/{v1}")
    assert e.message_id == "KART40063-E"
    e = job_error(api, "POST", "luns", {"portId": "CL1-A", "hostGroupNumber": 0, "ldevId": v1})
    assert e.message_id == "KART40063-E"
    e = job_error(api, "POST", f"ldevs/{v1}/actions/expand/invoke",
                  {"parameters": {"additionalByteFormatCapacity": "1G"}})
    assert e.message_id == "KART40063-E"
    # an LDEV with an LU path cannot become a journal volume; nor a volume of another journal
    api.add_lun(v2)
    r = post(api, "journals", {"journalId": 1, "ldevIds": [v2]})
    assert_error(r, 412, "KART40104-E")
    r = post(api, "journals", {"journalId": 1, "ldevIds": [v1]})
    assert_error(r, 412, "KART40104-E")


def test_journal_create_refused(api: VspClient) -> None:
    v1, v2, v3 = (api.create_ldev("64M") for _ in range(3))
    api.create_journal(7, [v1])
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"journalId": 7, "ldevIds": [v2]}, 409, "KART40054-E"),  # duplicate id
        ({"journalId": 256, "ldevIds": [v2]}, 400, "KART40039-E"),  # id out of range
        ({"journalId": -1, "ldevIds": [v2]}, 400, "KART40039-E"),
        ({"journalId": 8, "ldevIds": [9999]}, 404, "KART30013-E"),  # missing ldev
        ({"journalId": 8, "ldevIds": [v2, v3, v1]}, 400, "KART40039-E"),  # too many
        ({"journalId": 8, "ldevIds": []}, 400, "KART40039-E"),
        ({"journalId": 8, "ldevIds": [v2, v2]}, 400, "KART40039-E"),
        ({"journalId": 8}, 400, "KART40037-E"),
        ({"journalId": 8, "ldevIds": [v2], "unknown": True}, 400, "KART40038-E"),  # unknown field
        ({"journalId": "8", "ldevIds": [v2]}, 400, "KART40039-E"),  # strict types
        ({"journalId": 8, "startLdevId": v2, "endLdevId": v2 + 5}, 400, "KART40039-E"),
    ]
    for body, status, mid in cases:
        assert_error(post(api, "journals", body), status, mid)
    # range form
    api.invoke("POST", "journals", {"journalId": 8, "startLdevId": v2, "endLdevId": v3})
    assert api.get("journals/8")["numOfLdevs"] == 2
    assert_error(api.raw("GET", "v1/objects/journals?journalInfo=timer", headers=api.headers()), 400,
                 "KART40042-E")
    r = api.raw("GET", "v1/objects/journals/300", headers=api.headers())
    assert r.status_code == 400, r.text
    assert_error(api.raw("GET", "v1/objects/journals/9", headers=api.headers()), 404, "KART30013-E")
    # patch refusals
    for body in ({"copySpeed": 7}, {"dataOverflowWatchInSeconds": 601},
                 {"mirrorUnit": {"muNumber": 4}}, {"mirrorUnit": {"muNumber": 0, "copyPace": "X"}},
                 {"mirrorUnit": {"muNumber": 0, "pathBlockadeWatchInMinutes": 61}}):
        assert_error(post(api, "journals/7", body, "PATCH"), 400, "KART40039-E")
    assert_error(post(api, "journals/7", {"bogus": 1}, "PATCH"), 400, "KART40038-E")
    e = job_error(api, "POST", "journals/7/actions/assign-mp-blade/invoke", {"parameters": {"mpBladeId": 99}})
    assert e.message_id == "KART40039-E"
    assert_error(post(api, "journals/7/actions/expand/invoke", {"ldevIds": [v2]}), 400, "KART40038-E")
    assert_error(post(api, "journals/99/actions/expand/invoke", {"parameters": {"ldevIds": [v2]}}), 404,
                 "KART30013-E")
    # storage-scoped form
    scoped = api.request("GET", f"storages/{api.storage_device_id}/journals", params={"journalInfo": "detail"})
    assert [j["journalId"] for j in scoped["data"]] == [7, 8]

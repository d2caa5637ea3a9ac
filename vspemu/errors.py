"""The array's error vocabulary, in one table.

Every error that vspemu reports, over REST or inside a failed job, is a :class:`VspError` built from an
entry of :data:`MESSAGES`. The domain code raises them; the API layer turns them into the array's JSON
error body (errorSource, messageId, message, cause, solution, solutionType, errorCode, detailCode).

Message ids marked "seen" are ids that real clients match on (see shared/docs/api-spec.md section 8.3).
The others are emulator choices in the array's KARTnnnnn-E style, documented here so that users can
match on them; the real array may use other ids for the same condition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Message:
    message_id: str
    status: int  # the HTTP status the array answers with
    text: str
    solution: str
    solution_type: str = "SEE_ERROR_DETAIL"
    ssb: tuple[str, str] | None = None


MESSAGES: dict[str, Message] = {
    # --- request shape (400) -------------------------------------------------------------------
    "UNSUPPORTED_PARAMETER": Message(  # seen
        "KART40038-E", 400,
        "An unsupported parameter is specified in the request body, or the hierarchy of the specified "
        "parameter is invalid. (attribute = {attribute})",
        "Check whether the specified attribute is correct, and whether the attribute is specified in the "
        "correct hierarchy."),
    "INVALID_VALUE": Message(
        "KART40039-E", 400,
        "The specified value is invalid. (attribute = {attribute}, value = {value})",
        "Specify a valid value, and then retry the operation."),
    "MISSING_PARAMETER": Message(
        "KART40037-E", 400,
        "A required parameter is not specified. (attribute = {attribute})",
        "Specify the required parameter, and then retry the operation."),
    "MALFORMED_BODY": Message(
        "KART40036-E", 400,
        "The request body cannot be parsed as JSON.",
        "Check the format of the request body, and then retry the operation."),
    "INVALID_QUERY": Message(
        "KART40042-E", 400,
        "The specified query parameter is invalid. (parameter = {attribute})",
        "Check the query parameters, and then retry the operation."),
    "INVALID_OBJECT_ID": Message(
        "KART40043-E", 400,
        "The specified object ID is invalid. (object ID = {object_id})",
        "Check the object ID, and then retry the operation."),
    # --- authentication (401/403) -----------------------------------------------------------------
    "AUTH_FAILED": Message(  # seen: clients match on "User authentication failed"
        "KART40047-E", 401,
        "User authentication failed.",
        "Check the user ID and password, and then retry the operation."),
    "TOKEN_INVALID": Message(  # seen: clients match on "The specified token is invalid"
        "KART40048-E", 401,
        "The specified token is invalid.",
        "Create a session, and then retry the operation with the new token."),
    "REMOTE_AUTH_MISSING": Message(
        "KART40060-E", 400,
        "The Remote-Authorization header is not specified. The operation requires authentication on the "
        "remote storage system.",
        "Specify Remote-Authorization: Session <token of a session on the remote storage system>."),
    "REMOTE_AUTH_INVALID": Message(
        "KART40061-E", 401,
        "Authentication on the remote storage system failed. The specified remote token is invalid. "
        "(remote storage = {remote})",
        "Create a session on the remote storage system, and then retry with its token."),
    # --- not found / method (404/405) ------------------------------------------------------------
    "NOT_FOUND": Message(  # seen
        "KART30013-E", 404,
        "The specified object does not exist. (object = {object_id})",
        "Check the object ID, and then retry the operation."),
    "URL_NOT_FOUND": Message(
        "KART30000-E", 404,
        "The specified URL does not exist. (URL = {url})",
        "Check the URL, and then retry the operation."),
    "METHOD_NOT_ALLOWED": Message(
        "KART30001-E", 405,
        "The specified HTTP method is not supported for this resource. (method = {method})",
        "Check the HTTP method, and then retry the operation."),
    "INSTANCE_CANNOT_OPERATE": Message(  # seen: cinder uses it to learn that a copy group is gone
        "KART40041-E", 404,
        "The instance cannot be operated. (object = {object_id})",
        "Check the state of the object, and then retry the operation."),
    # --- conflicts and state (409/412) -----------------------------------------------------------
    "ALREADY_EXISTS": Message(
        "KART40045-E", 409,
        "The specified object already exists. (object = {object_id})",
        "Specify an object that does not exist, and then retry the operation.",
        ssb=("2E22", "0001")),
    "LDEV_ID_EXHAUSTED": Message(
        "KART40046-E", 412,
        "No usable ID is available. (resource = {resource})",
        "Delete unused objects, and then retry the operation.",
        ssb=("2E11", "2209")),
    "LUN_ALREADY_DEFINED": Message(
        "KART40044-E", 409,
        "The LU path is already defined. (port = {port}, host group = {hg}, LUN = {lun})",
        "Specify an LU path that is not defined.",
        ssb=("B958", "015A")),
    "LOCKED": Message(  # seen: clients retry on 40050-E..40052-E
        "KART40050-E", 409,
        "The resource group is locked by another session. (session = {owner})",
        "Wait until the lock is released, and then retry the operation.",
        solution_type="RETRY", ssb=("2E11", "2205")),
    "NOT_LOCKED": Message(
        "KART40053-E", 412,
        "The resource group is not locked by this session.",
        "Lock the resource group, and then retry the operation."),
    "WRONG_STATE": Message(
        "KART40062-E", 412,
        "The operation cannot be performed in the current state of the object. ({detail})",
        "Check the state of the object, and then retry the operation."),
    "IN_USE": Message(
        "KART40063-E", 412,
        "The object is in use and cannot be changed. ({detail})",
        "Release the object from its current use, and then retry the operation."),
    "CAPACITY": Message(
        "KART40064-E", 412,
        "The pool does not have enough free capacity. (pool = {pool}, requested = {requested})",
        "Free capacity in the pool, and then retry the operation."),
    # --- issue 16: APIs vspemu does not model, and user permissions (emulator ids) -------------------
    "API_NOT_SUPPORTED": Message(  # clients match on the text (the collection tolerates it for optional facts)
        "KART40033-E", 400,
        "The API is not supported for the specified storage system. ({detail})",
        "Check the storage system model and the API, and then retry the operation."),
    "NO_PERMISSION": Message(
        "KART40049-E", 403,
        "The user does not have the permission to perform this operation. (user = {user})",
        "Log in as a user that belongs to a user group with the required role, and then retry the operation."),
    # --- remote storage systems and journals (issue 4; emulator ids from KART40101-E on) -----------
    "REMOTE_IS_SELF": Message(
        "KART40101-E", 400,
        "The specified storage system is the local storage system. (storageDeviceId = {device})",
        "Specify the storage device ID and REST server of another storage system."),
    "REMOTE_MISMATCH": Message(
        "KART40102-E", 412,
        "The storage system at the specified REST server is not the specified storage system. "
        "(specified = {expected}, found = {found})",
        "Check the storage device ID, the REST server address and the Remote-Authorization token."),
    "JOURNAL_ID_IN_USE": Message(  # seen: cinder matches KART40054-E when it picks a journal id
        "KART40054-E", 409,
        "The specified journal ID is already in use. (journal = {journal})",
        "Specify an unused journal ID.",
        ssb=("2E23", "5001")),
    "JOURNAL_VOLUMES_MAX": Message(
        "KART40103-E", 412,
        "The journal already has the maximum number of journal volumes. (journal = {journal}, maximum = "
        "{maximum})",
        "Remove a journal volume, or use another journal."),
    "JOURNAL_VOLUME_INVALID": Message(
        "KART40104-E", 412,
        "The LDEV cannot be used as a journal volume. (ldev = {ldev}, reason = {reason})",
        "Specify a DP volume that has no LU path, is not paired and is not in another journal."),
    # --- busy / limits (413, 429, 503) ---------------------------------------------------------------
    "BODY_TOO_LARGE": Message(  # emulator id: the request body is refused before it is read
        "KART40066-E", 413,
        "The request body is too large. (maximum = {limit} bytes)",
        "Send a smaller request body."),
    "BUSY": Message(  # seen: clients retry on 503 KART00003-E (REST server busy)
        "KART00003-E", 503,
        "The REST server is busy. ({detail})",
        "Wait a while, and then retry the operation.",
        solution_type="RETRY"),
    "AUTH_BACKOFF": Message(  # emulator id: too many failed logins from this client or for this user
        "KART40067-E", 401,
        "User authentication failed. Too many failed attempts; authentication is refused for {seconds} "
        "more seconds.",
        "Wait, check the user ID and password, and then retry the operation.",
        solution_type="RETRY"),
    "SESSION_LIMIT": Message(
        "KART40055-E", 503,
        "The number of sessions has reached the maximum ({limit}).",
        "Discard unused sessions, and then retry the operation.",
        solution_type="RETRY"),
    "INTERNAL": Message(
        "KART00001-E", 500,
        "An internal error occurred in the storage system. ({detail})",
        "Collect the server log, and then contact the administrator.",
        solution_type="RETRY"),
    "REMOTE_UNREACHABLE": Message(
        "KART40065-E", 412,
        "Communication with the remote storage system failed. ({detail})",
        "Check the remote storage system and the network, and then retry the operation.",
        solution_type="RETRY"),
}


class VspError(Exception):
    """An error in the array's vocabulary. Raised by the domain; rendered by the API."""

    def __init__(self, key: str, cause: str | None = None, **fields: Any) -> None:
        self.key = key
        self.spec = MESSAGES[key]
        self.fields = fields
        try:
            self.message = self.spec.text.format(**fields)
        except (KeyError, IndexError):
            self.message = self.spec.text
        self.cause = cause
        super().__init__(f"{self.spec.message_id} {self.message}")

    @property
    def status(self) -> int:
        return self.spec.status

    @property
    def message_id(self) -> str:
        return self.spec.message_id

    def body(self, error_source: str) -> dict[str, Any]:
        spec = self.spec
        body: dict[str, Any] = {
            "errorSource": error_source,
            "messageId": spec.message_id,
            "message": self.message,
            "solution": spec.solution,
            "solutionType": spec.solution_type,
        }
        if self.cause:
            body["cause"] = self.cause
        if spec.ssb:
            body["errorCode"] = {"SSB1": spec.ssb[0], "SSB2": spec.ssb[1]}
        num = spec.message_id[4:9]
        body["detailCode"] = f"{num}{spec.message_id[-1]}-0"
        return body


def not_found(kind: str, object_id: object) -> VspError:
    return VspError("NOT_FOUND", object_id=f"{kind} {object_id}")


def invalid(attribute: str, value: object, cause: str | None = None) -> VspError:
    return VspError("INVALID_VALUE", cause=cause, attribute=attribute, value=value)

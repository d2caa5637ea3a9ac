"""The NBD protocol's numbers (fixed newstyle handshake, simple replies), shared by the server and the client.

See https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md.
"""

from __future__ import annotations

import struct

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC_OPT = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_INFO = 6
OPT_GO = 7

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6

INFO_EXPORT = 0
INFO_NAME = 1
INFO_BLOCK_SIZE = 3

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1

REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length (28 bytes)
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle (16 bytes)
OPT_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length

"""The wire: `tandem.v1` .proto sources and their generated Python (`protos/tandem/v1`), the single
source of truth for every message; `scripts/gen_protos.py` regenerates them and a test fails
when they are stale. `protos.enums` is the one map between the core's StrEnums and the protos'
enums.

May import: protobuf and grpcio; `protos.enums` also the core (`tandem_core`). Only the
transport layers (servicers, clients) and the SDK import it.
"""

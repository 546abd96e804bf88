"""Generated from proto/tandem/v1/tandem.proto by tools/gen_proto.py; do not edit."""

"""The Tandem client SDK: importable with grpcio and protobuf alone."""

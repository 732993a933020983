"""Client package of the integrations credential service.

The generated protobuf and gRPC code of `integrations.v1` ships beside this
package as `integrations.v1.integrations_pb2` and `integrations_pb2_grpc`.
"""

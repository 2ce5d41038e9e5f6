"""A kiam client that shares no code with iamlet: Python grpcio stubs generated at run time
from the repository's src/kiam/kiam.proto, over mutual TLS, as kiam's own agents speak it.

Usage: kiam_client.py PROTO_DIR ADDRESS SERVER_NAME CA [CERT KEY] < calls.json

calls.json is a list of calls, e.g. [{"method": "GetPodRole", "ip": "10.0.0.1"},
{"method": "GetPodCredentials", "ip": "10.0.0.1", "role": "web"}, {"method": "GetHealth"}].
Prints a JSON list with one result per call: {"ok": {fields}} or {"code": "UNKNOWN",
"details": "no pod found"}. Without CERT and KEY the client presents no certificate.
"""

import json
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc


def stubs(proto_dir):
    out = tempfile.mkdtemp(prefix="kiam-stubs-")
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            os.path.join(proto_dir, "kiam.proto"),
        ]
    )
    if status != 0:
        sys.exit(f"protoc failed with {status}")
    sys.path.insert(0, out)
    import kiam_pb2  # noqa: E402
    import kiam_pb2_grpc  # noqa: E402

    return kiam_pb2, kiam_pb2_grpc


def read(path):
    with open(path, "rb") as file:
        return file.read()


def main():
    proto_dir, address, server_name, ca = sys.argv[1:5]
    cert_key = sys.argv[5:7]
    pb, pb_grpc = stubs(proto_dir)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(ca),
        private_key=read(cert_key[1]) if cert_key else None,
        certificate_chain=read(cert_key[0]) if cert_key else None,
    )
    channel = grpc.secure_channel(
        address, credentials, options=[("grpc.ssl_target_name_override", server_name)]
    )
    client = pb_grpc.KiamServiceStub(channel)
    results = []
    for call in json.load(sys.stdin):
        method = call["method"]
        try:
            if method == "GetPodRole":
                answer = client.GetPodRole(pb.GetPodRoleRequest(ip=call["ip"]), timeout=5)
                results.append({"ok": {"name": answer.name}})
            elif method == "GetPodCredentials":
                request = pb.GetPodCredentialsRequest(ip=call["ip"], role=call["role"])
                answer = client.GetPodCredentials(request, timeout=5)
                results.append(
                    {
                        "ok": {
                            "code": answer.code,
                            "type": answer.type,
                            "access_key_id": answer.access_key_id,
                            "secret_access_key": answer.secret_access_key,
                            "token": answer.token,
                            "expiration": answer.expiration,
                            "last_updated": answer.last_updated,
                        }
                    }
                )
            elif method == "GetHealth":
                answer = client.GetHealth(pb.GetHealthRequest(), timeout=5)
                results.append({"ok": {"message": answer.message}})
            else:
                sys.exit(f"unknown method {method}")
        except grpc.RpcError as error:
            results.append({"code": error.code().name, "details": error.details()})
    print(json.dumps(results))


if __name__ == "__main__":
    main()

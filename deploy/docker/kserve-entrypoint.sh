#!/bin/bash
# The entrypoint of deploy/docker/Dockerfile.kserve: the base image's dockerd-entrypoint.sh (start what the serving
# runtime's args say, TorchServe, then KServe's server in the foreground), with KServe's server started through
# serving/kserve_front.py, which runs the image's own kserve_wrapper and passes TorchServe's 4xx/503 on to the
# client instead of KServe's 500. serving/kserve_pod.py runs this file as it is (KSERVE_FRONT: where the module lies).
set -e
eval "$@"
exec python "${KSERVE_FRONT:-/home/model-server/kserve_front.py}"

"""The VMThunder CSI driver: volumes are copy-on-write disks of an ImageCache.

Identity (identity.py), Controller (controller.py) and Node (node.py) services over the
volume state in the API server (kube.py) and a node backend (backend.py, cow.py). The gRPC
stubs in proto/ are generated from the CSI spec by scripts/gen-csi-stubs.sh.
"""

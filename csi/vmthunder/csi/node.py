"""CSI Node service: the volume's copy-on-write device on this node, handed to the pod.

NodeStageVolume waits until the node's replica of the image is Attached (a VM boots while
the cache hydrates) and builds the COW device; NodePublishVolume bind-mounts the device
node onto the target path (block, KubeVirt's path) or bind-mounts the staged filesystem.
The ImageVolume carries a finalizer while the volume's data is on this node; the Reclaimer
frees the data once the volume is deleted, then drops the finalizer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, TypeVar

import grpc

from vmthunder.csi import capabilities, mount
from vmthunder.csi.backend import BackendError, CowDevice, CowSpec, NodeBackend, NotStaged
from vmthunder.csi.errors import CsiError, invalid, not_found
from vmthunder.csi.kube import KubeState, Volume, phase_of, wait_for
from vmthunder.csi.names import (
    ATTACHED_REPLICA_PHASES,
    FINALIZER_COW_DATA,
    TOPOLOGY_KEY,
    ready_for_vms,
)
from vmthunder.csi.proto import csi_pb2, csi_pb2_grpc

RPC = csi_pb2.NodeServiceCapability.RPC
AccessMode = csi_pb2.VolumeCapability.AccessMode
SECTOR: Final = 512
# How often the boot set's wait looks again with no change: a hold ends by time too
# (status.holdUntil), and no event says so when its agent is gone.
HOLD_RECHECK_SECONDS: Final = 5.0
log = logging.getLogger(__name__)
T = TypeVar("T")


class VolumeLocks:
    """One operation per volume at a time; a second one gets Aborted (the CO retries)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._busy: set[str] = set()

    @contextlib.contextmanager
    def hold(self, volume_id: str) -> Iterator[None]:
        with self._guard:
            if volume_id in self._busy:
                raise CsiError(grpc.StatusCode.ABORTED,
                               f"an operation on volume {volume_id} is in progress")
            self._busy.add(volume_id)
        try:
            yield
        finally:
            with self._guard:
                self._busy.discard(volume_id)


def _rdev(path: str) -> int | None:
    try:
        return os.stat(path).st_rdev
    except FileNotFoundError:
        return None


def _mount_dev(m: mount.MountInfo) -> int:
    return os.makedev(m.major, m.minor)


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, node_id: str, state: KubeState, backend: NodeBackend,
                 locks: VolumeLocks, stage_wait: float = 60.0) -> None:
        self.node_id = node_id
        self.state = state
        self.backend = backend
        self.locks = locks
        self.stage_wait = stage_wait

    # --- info ---

    def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.node_id,
            accessible_topology=csi_pb2.Topology(segments={TOPOLOGY_KEY: self.node_id}),
        )

    def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[
            csi_pb2.NodeServiceCapability(rpc=RPC(type=t))
            for t in (RPC.STAGE_UNSTAGE_VOLUME, RPC.GET_VOLUME_STATS, RPC.EXPAND_VOLUME)
        ])

    # --- stage / unstage ---

    def NodeStageVolume(
        self, request: csi_pb2.NodeStageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeStageVolumeResponse:
        volume_id, staging = request.volume_id, request.staging_target_path
        if not volume_id:
            raise invalid("volume_id is required")
        if not staging:
            raise invalid("staging_target_path is required")
        cap = capabilities.require_one(request.volume_capability,
                                       request.HasField("volume_capability"))
        with self.locks.hold(volume_id):
            volume = self._volume(volume_id)
            if volume.node != self.node_id:
                raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"volume {volume_id} lives on node {volume.node}")
            # Before any data exists, so a deleted volume's data is always freed.
            self.state.add_finalizer(volume_id)
            deadline = time.monotonic() + self.stage_wait
            image_device = self._wait_for_image(volume, deadline)
            device = self._backend(lambda: self.backend.stage(
                CowSpec(volume_id, image_device, volume.capacity_bytes)))
            # Built while the boot set is prefetched; kubelet starts nothing before we return.
            self._wait_for_boot_set(volume, deadline)
            if cap.HasField("mount"):
                self._stage_filesystem(device, staging, cap)
            self.state.set_phase(volume_id, "Staged")
        return csi_pb2.NodeStageVolumeResponse()

    def _wait_for_image(self, volume: Volume, deadline: float) -> str:
        """The image device, once the node agent reports the replica attached."""
        usable, status = self.state.wait_replica(
            volume.image_cache, self.node_id, lambda s: phase_of(s) in ATTACHED_REPLICA_PHASES,
            max(0.0, deadline - time.monotonic()))
        phase = phase_of(status)
        found: list[str] = []

        def device() -> bool:  # the agent reports Attached after building it: at once, mostly
            path = self.backend.image_device(volume.image_cache)
            if path:
                found.append(path)
            return bool(path)

        if not usable or not wait_for(device, max(0.0, deadline - time.monotonic()),
                                      interval=0.5):
            raise CsiError(
                grpc.StatusCode.UNAVAILABLE,
                f"the replica of {volume.image_cache} on {self.node_id} is not attached yet "
                f"(phase {phase or 'none'}); retry",
            )
        return found[-1]

    def _wait_for_boot_set(self, volume: Volume, deadline: float) -> None:
        """Until the agent has prefetched the boot profile (or stopped holding volumes for it),
        so the VM's boot reads find their blocks local."""
        usable, status = self.state.wait_replica(
            volume.image_cache, self.node_id, lambda s: ready_for_vms(s, datetime.now(UTC)),
            max(0.0, deadline - time.monotonic()), recheck=HOLD_RECHECK_SECONDS)
        phase = phase_of(status)
        if not usable:
            raise CsiError(
                grpc.StatusCode.UNAVAILABLE,
                f"the replica of {volume.image_cache} on {self.node_id} is not ready for a VM "
                f"yet (phase {phase or 'none'}: the boot profile is prefetched first); retry",
            )

    def _stage_filesystem(self, device: CowDevice, staging: str,
                          cap: csi_pb2.VolumeCapability) -> None:
        current = mount.mounted_at(staging)
        if current is not None:
            if _mount_dev(current) != _rdev(device.path):
                raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                               f"{staging} holds another mount ({current.source})")
            return
        fstype = capabilities.fs_type(cap)
        found = mount.signatures(device.path)
        if not found:
            mount.mkfs(device.path, fstype)
        elif found.get("TYPE") != fstype:
            # The image is a whole disk (partition table) or another filesystem: formatting
            # it would destroy the image's content for this volume.
            raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"the volume holds {found.get('TYPE') or found.get('PTTYPE')}, "
                           f"not {fstype}: use volumeMode Block")
        Path(staging).mkdir(parents=True, exist_ok=True)
        mount.mount(device.path, staging, fstype, list(cap.mount.mount_flags),
                    readonly=cap.access_mode.mode == AccessMode.SINGLE_NODE_READER_ONLY)

    def NodeUnstageVolume(
        self, request: csi_pb2.NodeUnstageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnstageVolumeResponse:
        volume_id, staging = request.volume_id, request.staging_target_path
        if not volume_id:
            raise invalid("volume_id is required")
        if not staging:
            raise invalid("staging_target_path is required")
        with self.locks.hold(volume_id):
            while mount.mounted_at(staging) is not None:
                mount.umount(staging)
            self._backend(lambda: self.backend.unstage(volume_id))
            self.state.set_phase(volume_id, "Pending")
        return csi_pb2.NodeUnstageVolumeResponse()

    # --- publish / unpublish ---

    def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodePublishVolumeResponse:
        volume_id, target, staging = (request.volume_id, request.target_path,
                                      request.staging_target_path)
        if not volume_id:
            raise invalid("volume_id is required")
        if not target:
            raise invalid("target_path is required")
        cap = capabilities.require_one(request.volume_capability,
                                       request.HasField("volume_capability"))
        if not staging:
            raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                           "staging_target_path is required: the volume must be staged")
        readonly = request.readonly or cap.access_mode.mode == AccessMode.SINGLE_NODE_READER_ONLY
        with self.locks.hold(volume_id):
            self._volume(volume_id)
            device = self.backend.device(volume_id)
            if device is None:
                raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"volume {volume_id} is not staged on this node")
            if cap.HasField("block"):
                self._publish_block(device, target, readonly)
            else:
                self._publish_mount(staging, target, readonly)
            self.state.set_phase(volume_id, "Published")
        return csi_pb2.NodePublishVolumeResponse()

    def _publish_block(self, device: CowDevice, target: str, readonly: bool) -> None:
        current = mount.mounted_at(target)
        if current is not None:
            if _rdev(target) != _rdev(device.path):
                raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                               f"{target} holds another device")
            if current.readonly != readonly:
                raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                               f"{target} is published with another read-only flag")
            return
        # For block volumes the CO makes the parent directory and the plugin the file.
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).touch(exist_ok=True)
        mount.bind(device.path, target, readonly)

    def _publish_mount(self, staging: str, target: str, readonly: bool) -> None:
        staged = mount.mounted_at(staging)
        if staged is None:
            raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"nothing is mounted at the staging path {staging}")
        current = mount.mounted_at(target)
        if current is not None:
            if _mount_dev(current) != _mount_dev(staged):
                raise CsiError(grpc.StatusCode.ALREADY_EXISTS, f"{target} holds another mount")
            if current.readonly != readonly:
                raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                               f"{target} is mounted with other flags")
            return
        Path(target).mkdir(parents=True, exist_ok=True)
        mount.bind(staging, target, readonly)

    def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        volume_id, target = request.volume_id, request.target_path
        if not volume_id:
            raise invalid("volume_id is required")
        if not target:
            raise invalid("target_path is required")
        with self.locks.hold(volume_id):
            while mount.mounted_at(target) is not None:
                mount.umount(target)
            path = Path(target)
            if path.is_dir():
                path.rmdir()
            elif path.exists() or path.is_symlink():
                path.unlink()
            if self.backend.device(volume_id) is not None:
                self.state.set_phase(volume_id, "Staged")
        return csi_pb2.NodeUnpublishVolumeResponse()

    # --- stats, expansion ---

    def NodeGetVolumeStats(
        self, request: csi_pb2.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        volume_id, path = request.volume_id, request.volume_path
        if not volume_id:
            raise invalid("volume_id is required")
        if not path:
            raise invalid("volume_path is required")
        device = self._published_device(volume_id, path)
        mode = os.stat(path).st_mode
        Unit = csi_pb2.VolumeUsage.Unit
        if stat.S_ISBLK(mode):
            usage = [csi_pb2.VolumeUsage(total=device.size_bytes, unit=Unit.BYTES)]
        else:
            fs = os.statvfs(path)
            usage = [
                csi_pb2.VolumeUsage(total=fs.f_blocks * fs.f_frsize,
                                    available=fs.f_bavail * fs.f_frsize,
                                    used=(fs.f_blocks - fs.f_bfree) * fs.f_frsize,
                                    unit=Unit.BYTES),
                csi_pb2.VolumeUsage(total=fs.f_files, available=fs.f_favail,
                                    used=fs.f_files - fs.f_ffree, unit=Unit.INODES),
            ]
        if not device.healthy:  # spec v1.13 dropped VolumeCondition: say it in the log
            log.error("volume %s: %s", volume_id, device.message)
        return csi_pb2.NodeGetVolumeStatsResponse(usage=usage)

    def _published_device(self, volume_id: str, path: str) -> CowDevice:
        """The volume's device, if `path` is where this volume is staged or published."""
        device = self.backend.device(volume_id)
        if device is None:
            if self.state.get_volume(volume_id) is None:
                raise not_found(f"volume {volume_id} does not exist")
            raise not_found(f"volume {volume_id} is not staged on this node")
        if not os.path.exists(path):
            raise not_found(f"{path} does not exist")
        current = mount.mounted_at(path)
        if current is None or _rdev(device.path) not in (_mount_dev(current), _rdev(path)):
            raise not_found(f"volume {volume_id} is not at {path}")
        return device

    def NodeExpandVolume(
        self, request: csi_pb2.NodeExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeExpandVolumeResponse:
        volume_id, path = request.volume_id, request.volume_path
        if not volume_id:
            raise invalid("volume_id is required")
        if not path:
            raise invalid("volume_path is required")
        if request.HasField("volume_capability"):
            capabilities.require_one(request.volume_capability, True)
        with self.locks.hold(volume_id):
            volume = self._volume(volume_id)
            device = self._published_device(volume_id, path)
            required = -(-request.capacity_range.required_bytes // SECTOR) * SECTOR
            wanted = max(required, volume.capacity_bytes)
            limit = request.capacity_range.limit_bytes
            if limit and wanted > limit:
                raise CsiError(grpc.StatusCode.OUT_OF_RANGE,
                               f"{wanted} bytes exceed limit_bytes {limit}")
            if wanted > device.size_bytes:
                device = self._backend(lambda: self.backend.expand(volume_id, wanted))
            if not stat.S_ISBLK(os.stat(path).st_mode):
                fs = mount.mounted_at(path)
                if fs is not None:
                    mount.grow(device.path, path, fs.fstype)
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=device.size_bytes)

    # --- helpers ---

    def _volume(self, volume_id: str) -> Volume:
        volume = self.state.get_volume(volume_id)
        if volume is None or volume.deleting:
            raise not_found(f"volume {volume_id} does not exist")
        return volume

    def _backend(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except NotStaged as e:
            raise CsiError(grpc.StatusCode.FAILED_PRECONDITION, str(e)) from e
        except BackendError as e:
            raise CsiError(grpc.StatusCode.INTERNAL, str(e)) from e


class Reclaimer:
    """Frees the data of this node's deleted volumes, then drops their finalizer."""

    def __init__(self, node_id: str, state: KubeState, backend: NodeBackend,
                 locks: VolumeLocks, resync_seconds: int = 60) -> None:
        self.node_id = node_id
        self.state = state
        self.backend = backend
        self.locks = locks
        self.resync_seconds = resync_seconds

    def reclaim(self, volume: Volume) -> bool:
        if not volume.deleting or FINALIZER_COW_DATA not in volume.finalizers:
            return False
        try:
            with self.locks.hold(volume.volume_id):
                self.backend.delete(volume.volume_id)
                self.state.remove_finalizer(volume.volume_id)
        except (CsiError, BackendError) as e:  # busy or still in use: the next pass retries
            log.warning("reclaiming volume %s: %s", volume.volume_id, e)
            return False
        log.info("reclaimed volume %s", volume.volume_id)
        return True

    def reclaim_all(self) -> int:
        return sum(self.reclaim(v) for v in self.state.list_volumes(self.node_id))

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.reclaim_all()
                for _, volume in self.state.watch_volumes(self.node_id, self.resync_seconds):
                    self.reclaim(volume)
                    if stop.is_set():
                        return
            except Exception as e:  # API server away, watch expired: start over
                log.warning("reclaimer: %s", e)
                stop.wait(2)

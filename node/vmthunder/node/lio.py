"""LIO iSCSI targets via rtslib-fb: a read-only block LUN per export, CHAP, an ACL per initiator.

State lives in configfs, so `exports()` rediscovers what an earlier run built. Every failure
raises LioError, CHAP passwords in rtslib's message replaced by iscsi.REDACTED. rtslib-fb is
Debian's python3-rtslib-fb; under the project venv its dist-packages directory is appended to
sys.path on first use.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vmthunder.node.iscsi import Chap, redact

CONFIGFS = "/sys/kernel/config/target"
_DIST = "/usr/lib/python3/dist-packages"


class LioError(RuntimeError):
    """A configfs/rtslib operation failed; `stderr` carries the library's message."""

    def __init__(self, what: str, stderr: str) -> None:
        super().__init__(f"lio {what} failed: {stderr.strip()}")
        self.what = what
        self.stderr = stderr


def _rtslib() -> Any:
    try:
        import rtslib_fb  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        if _DIST not in sys.path:
            sys.path.append(_DIST)
        try:
            import rtslib_fb  # type: ignore[import-not-found, unused-ignore]
        except ImportError as e:
            raise LioError("import rtslib_fb", str(e)) from e
    return rtslib_fb


@dataclass(frozen=True)
class ExportSpec:
    iqn: str
    backstore: str  # iblock storage object name
    device: str  # block device to export
    ip: str
    port: int = 3260
    lun: int = 0
    chap: Chap | None = None
    initiators: tuple[str, ...] = ()  # one ACL (and CHAP) per initiator IQN


@dataclass(frozen=True)
class ExportInfo:
    iqn: str
    backstore: str
    device: str
    portals: tuple[str, ...]
    initiators: tuple[str, ...]


def _ensure_configfs() -> None:
    if not os.path.isdir(CONFIGFS):
        os.system("modprobe -a target_core_mod iscsi_target_mod target_core_iblock "
                  ">/dev/null 2>&1")


def prepare() -> None:
    """Loads LIO's modules and rtslib ahead of the first export."""
    _ensure_configfs()
    _rtslib()


def ensure_export(spec: ExportSpec) -> None:
    """Creates or converges the export: backstore, target, portal, LUN, ACLs. Idempotent.

    ACLs of initiators no longer listed are removed, so a former child loses access.
    """
    _ensure_configfs()
    rts = _rtslib()
    try:
        root = rts.RTSRoot()
        so = next((s for s in root.storage_objects
                   if s.plugin == "block" and s.name == spec.backstore), None)
        if so is not None and os.path.realpath(so.udev_path) != os.path.realpath(spec.device):
            raise LioError(f"export {spec.iqn}",
                           f"backstore {spec.backstore} serves {so.udev_path}, not {spec.device}")
        if so is None:
            so = rts.BlockStorageObject(spec.backstore, dev=spec.device, readonly=True)
        fabric = rts.FabricModule("iscsi")
        target = rts.Target(fabric, spec.iqn, mode="any")
        tpg = rts.TPG(target, 1, mode="any")
        # No demo mode: only listed initiators; their LUN mapping is write-protected.
        tpg.set_attribute("generate_node_acls", "0")
        tpg.set_attribute("demo_mode_write_protect", "1")
        tpg.set_attribute("authentication", "1" if spec.chap else "0")
        if not any(p.ip_address == spec.ip and p.port == spec.port for p in tpg.network_portals):
            rts.NetworkPortal(tpg, spec.ip, spec.port, mode="any")
        lun = next((x for x in tpg.luns if x.lun == spec.lun), None)
        if lun is None:
            lun = rts.LUN(tpg, spec.lun, so)
        wanted = set(spec.initiators)
        for acl in list(tpg.node_acls):
            if acl.node_wwn not in wanted:
                acl.delete()
        for wwn in sorted(wanted):
            acl = rts.NodeACL(tpg, wwn, mode="any")
            if spec.chap is not None:
                acl.chap_userid = spec.chap.username
                acl.chap_password = spec.chap.password
                if spec.chap.mutual_username and spec.chap.mutual_password:
                    acl.chap_mutual_userid = spec.chap.mutual_username
                    acl.chap_mutual_password = spec.chap.mutual_password
            if not any(m.mapped_lun == spec.lun for m in acl.mapped_luns):
                rts.MappedLUN(acl, spec.lun, lun, write_protect=True)
        tpg.enable = True
    except LioError:
        raise
    except Exception as e:  # rtslib raises RTSLibError and OSErrors from configfs
        secrets = (spec.chap.password, spec.chap.mutual_password or "") if spec.chap else ()
        # Not chained when a secret is set: rtslib's own message may quote the value.
        raise LioError(f"export {spec.iqn}",
                       redact(f"{type(e).__name__}: {e}", secrets)) from (None if secrets else e)


def remove_export(iqn: str, backstore: str | None = None) -> None:
    """Deletes the target and its backstore; absent is success."""
    if not os.path.isdir(CONFIGFS):
        return
    rts = _rtslib()
    try:
        root = rts.RTSRoot()
        for t in root.targets:
            if t.wwn == iqn:
                t.delete()
        if backstore is not None:
            for s in root.storage_objects:
                if s.plugin == "block" and s.name == backstore:
                    s.delete()
    except Exception as e:
        raise LioError(f"remove {iqn}", f"{type(e).__name__}: {e}") from e


def exports() -> list[ExportInfo]:
    """The iSCSI exports configfs holds now (LUN 0 of TPG 1 of each target)."""
    if not os.path.isdir(f"{CONFIGFS}/iscsi"):
        return []
    rts = _rtslib()
    result = []
    try:
        root = rts.RTSRoot()
        for t in root.targets:
            if t.fabric_module.name != "iscsi":
                continue
            for tpg in t.tpgs:
                luns = list(tpg.luns)
                so = luns[0].storage_object if luns else None
                result.append(ExportInfo(
                    iqn=t.wwn,
                    backstore=so.name if so is not None else "",
                    device=so.udev_path if so is not None else "",
                    portals=tuple(f"{p.ip_address}:{p.port}" for p in tpg.network_portals),
                    initiators=tuple(sorted(a.node_wwn for a in tpg.node_acls)),
                ))
    except Exception as e:
        raise LioError("list exports", f"{type(e).__name__}: {e}") from e
    return result


def orphan_backstores(keep: Iterable[str]) -> list[str]:
    """Block backstores named vmt-* that no target uses and that are not in `keep`."""
    if not os.path.isdir(f"{CONFIGFS}/core"):
        return []
    rts = _rtslib()
    keep = set(keep)
    return [s.name for s in rts.RTSRoot().storage_objects
            if s.plugin == "block" and s.name.startswith("vmt-") and s.name not in keep
            and s.status != "activated"]

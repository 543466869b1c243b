"""Prepare the ECG caches (CinC 2017, MIT-BIH, CinC 2020/2021 12-lead) from the data folder, or first download
them from PhysioNet.

Usage:
    python data_prep/ecg.py [--data-dir DIR] [--dataset cinc2017|mitdb|cinc2021|all] [--fs 200]
                            [--lead NAME | --leads A,B] [--force]
    python data_prep/ecg.py --download DEST [--mirror URL_OR_DIR] [--dataset ...]   # for machines with a network
    python data_prep/ecg.py --dataset cinc2021 --archives WFDB_Ga.tar.gz ... --download DEST  # archives at hand

Local first: data already under the data folder (the archives of ../shared/data, or unpacked PhysioNet
folders) is never downloaded again. Downloads land in PhysioNet's layout, which the task reads directly:
``DEST/mitdb/*.hea|dat|atr``, ``DEST/cinc2017/training2017/*`` plus ``DEST/cinc2017/REFERENCE.csv``, and
``DEST/cinc2021/training/<source>/<group>/*.hea|mat`` (the Challenge 2021 training set, 43,101 records of which
the 2020 sets are a part: read with ``data.dataset = "cinc2021"``, ``data.path = DEST/cinc2021``). The cinc2021
download fetches each record's two files (about 88,000 requests; a rerun resumes) and checks them against the
project's SHA256SUMS.txt; ``--archives`` unpacks the Challenge's own ``WFDB_*.tar.gz`` archives instead, when a
user has them. ``all`` is cinc2017 and mitdb (cinc2021 is asked for by name: it is several GB).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from cnnapps.data.root import find_data_root
from cnnapps.tasks.ecg.prepare import ECGDataError, PrepParams, dataset_source, prepare_source

log = logging.getLogger("data_prep.ecg")

PHYSIONET = "https://physionet.org/files"
# (path under the PhysioNet files root, what to fetch)
PHYSIONET_PATHS = {"mitdb": "mitdb/1.0.0", "cinc2017": "challenge-2017/1.0.0", "cinc2021": "challenge-2021/1.0.3"}


def _base_url(base: str) -> str:
    """A URL for ``base``: http(s)/file URLs as given, a local mirror folder as a file:// URL."""
    if urllib.parse.urlparse(base).scheme in ("http", "https", "file"):
        return base.rstrip("/")
    return Path(base).expanduser().resolve().as_uri()


def _fetch(url: str, dest: Path, timeout: float) -> Path:
    """Download ``url`` to ``dest`` through a temporary file (an interrupted download leaves no partial file)."""
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as fh:
            shutil.copyfileobj(resp, fh)
    except OSError as exc:  # URLError is an OSError
        tmp.unlink(missing_ok=True)
        raise ECGDataError(f"cannot download {url}: {exc}") from exc
    tmp.rename(dest)
    return dest


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _check_sums(folder: Path, sums_file: Path, names: set[str]) -> None:
    """Compare downloaded files with PhysioNet's SHA256SUMS.txt; a mismatch removes the file and raises."""
    for line in sums_file.read_text().splitlines():
        parts = line.split()
        if len(parts) != 2 or parts[1] not in names:
            continue
        path = folder / parts[1]
        if path.is_file() and _sha256(path) != parts[0]:
            path.unlink()
            raise ECGDataError(f"{path}: SHA-256 differs from {sums_file}; removed, download again")


def _safe_unzip(archive: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                parts = Path(name).parts
                if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                    raise ECGDataError(f"{archive}: refusing unsafe member path {name!r}")
            zf.extractall(dest)
    except zipfile.BadZipFile as exc:
        raise ECGDataError(f"{archive}: not a readable zip archive ({exc})") from exc


def _record_list(root: str, folder: Path, sub: str, timeout: float, depth: int = 0) -> list[str]:
    """Record paths (relative to the project root, without suffix) from the ``RECORDS`` file of folder ``sub``;
    a line ending in ``/`` is a subfolder with its own ``RECORDS`` (PhysioNet's convention for nested sets)."""
    if depth > 8:
        raise ECGDataError(f"{root}/{sub}RECORDS: RECORDS files nested deeper than 8 folders")
    records = _fetch(f"{root}/{sub}RECORDS", folder / sub / "RECORDS", timeout)
    out: list[str] = []
    for line in (ln.strip() for ln in records.read_text().splitlines()):
        parts = Path(line).parts
        if not line or line.startswith("#"):
            continue
        if line.startswith("/") or ".." in parts:
            raise ECGDataError(f"{records}: refusing record path {line!r}")
        if line.endswith("/"):
            out += _record_list(root, folder, sub + line, timeout, depth + 1)
        else:
            out.append(sub + line)
    return out


def _fetch_checked(root: str, folder: Path, files: list[str], timeout: float, name: str, every: int,
                   also_checked: set[str] = frozenset()) -> None:
    """Fetch ``files`` (paths relative to ``root``) into ``folder``, logging progress every ``every`` files, then
    check them and ``also_checked`` against the mirror's SHA256SUMS.txt when it has one (a warning when not)."""
    for i, fname in enumerate(files, 1):
        _fetch(f"{root}/{fname}", folder / fname, timeout)
        if i % every == 0:
            log.info("%s: %d/%d files", name, i, len(files))
    try:
        sums = _fetch(f"{root}/SHA256SUMS.txt", folder / "SHA256SUMS.txt", timeout)
    except ECGDataError:
        log.warning("%s: no SHA256SUMS.txt at %s; files not verified", name, root)
    else:
        _check_sums(folder, sums, set(files) | set(also_checked))


def download_cinc2021(dest: str | Path, base_url: str = PHYSIONET, timeout: float = 60.0) -> Path:
    """Fetch the PhysioNet/CinC Challenge 2021 training records (``challenge-2021/1.0.3``: every record listed by
    its RECORDS files, ``.hea`` and ``.mat``) into ``dest/cinc2021`` and check them against the project's
    SHA256SUMS.txt when the mirror has it; returns ``dest/cinc2021`` (the task's ``data.path``). Files already
    present are kept, so a rerun resumes."""
    folder = Path(dest) / "cinc2021"
    root = f"{_base_url(base_url)}/{PHYSIONET_PATHS['cinc2021']}"
    names = _record_list(root, folder, "", timeout)
    if not names:
        raise ECGDataError(f"{root}/RECORDS lists no records")
    _fetch_checked(root, folder, [f"{n}.{ext}" for n in names for ext in ("hea", "mat")], timeout, "cinc2021",
                   every=2000)
    log.info("cinc2021: %d records in %s", len(names), folder)
    return folder


def extract_cinc2021_archives(archives: list[Path], dest: str | Path) -> dict[str, dict[str, int]]:
    """Unpack the Challenge's ``WFDB_*.tar.gz`` archives (one per source) into ``dest/cinc2021/<archive>/``
    (unsafe member paths, links and devices refused) and check each: every ``.hea`` needs its ``.mat``. Returns
    {archive: {"records": n, "without_signal": m}}; an archive without any record is an error naming it. An
    archive already unpacked (its folder exists) is checked, not unpacked again."""
    from cnnapps.tasks.ecg.prepare import safe_extract

    out: dict[str, dict[str, int]] = {}
    for archive in map(Path, archives):
        if not archive.is_file():
            raise ECGDataError(f"{archive}: archive not found")
        name = archive.name.removesuffix(".gz").removesuffix(".tar").removesuffix(".tgz")
        target = Path(dest) / "cinc2021" / name
        if not target.is_dir():
            tmp = target.with_name(f".{name}.part")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                safe_extract(archive, tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            tmp.rename(target)
        headers = sorted(target.rglob("*.hea"))
        if not headers:
            raise ECGDataError(f"{archive}: holds no WFDB records (*.hea)")
        lacking = [h for h in headers if not h.with_suffix(".mat").is_file()]
        for h in lacking[:5]:
            log.warning("%s: no signal file %s", archive, h.with_suffix(".mat").name)
        out[archive.name] = {"records": len(headers), "without_signal": len(lacking)}
        log.info("%s: %d records (%d without a .mat)", archive, len(headers), len(lacking))
    return out


def download_physionet(dataset: str, dest: str | Path, base_url: str = PHYSIONET, timeout: float = 60.0) -> Path:
    """Fetch ``dataset`` ("mitdb" | "cinc2017" | "cinc2021") from PhysioNet (or a mirror: a URL or a local folder laid out
    like PhysioNet's ``files/``) into ``dest``; returns the folder the task reads (``dest/<dataset>``).

    Files already present are kept (a rerun resumes). MIT-BIH files are checked against PhysioNet's
    SHA256SUMS.txt when the mirror has it.
    """
    if dataset not in PHYSIONET_PATHS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(PHYSIONET_PATHS)}")
    dest = Path(dest)
    if dataset == "cinc2021":
        return download_cinc2021(dest, base_url, timeout)
    root = f"{_base_url(base_url)}/{PHYSIONET_PATHS[dataset]}"
    if dataset == "mitdb":
        folder = dest / "mitdb"
        names = _record_list(root, folder, "", timeout)
        _fetch_checked(root, folder, [f"{n}.{ext}" for n in names for ext in ("hea", "dat", "atr")], timeout,
                       "mitdb", every=30, also_checked={"RECORDS"})
        return folder
    folder = dest / "cinc2017"
    if not (folder / "training2017" / "RECORDS").is_file():
        archive = _fetch(f"{root}/training2017.zip", folder / "training2017.zip", timeout)
        _safe_unzip(archive, folder)
        archive.unlink()
    reference = folder / "training2017" / "REFERENCE.csv"
    if not reference.is_file():
        raise ECGDataError(f"{root}/training2017.zip holds no training2017/REFERENCE.csv")
    shutil.copy(reference, folder / "REFERENCE.csv")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="data root (default: $CNNAPPS_DATA, ../shared/data, ...)")
    parser.add_argument("--dataset", default="all", choices=["cinc2017", "mitdb", "cinc2021", "all"])
    parser.add_argument("--fs", type=int, default=200, help="model sampling rate (Hz)")
    parser.add_argument("--lead", default=None, help="signal name (default: first for CinC, MLII for MIT-BIH)")
    parser.add_argument("--leads", default=None,
                        help="several leads, comma-separated (e.g. MLII,V1), or 'all'; a record lacking one reads "
                             "another ECG signal in its place (as data.leads with data.missing_lead = substitute)")
    parser.add_argument("--normalize", default="zscore", choices=["zscore", "robust", "none"])
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching cache exists")
    parser.add_argument("--download", type=Path, default=None, metavar="DEST",
                        help="download from PhysioNet into DEST first (only what DEST lacks), then prepare")
    parser.add_argument("--mirror", default=PHYSIONET, help="PhysioNet files root, or a mirror URL or folder")
    parser.add_argument("--archives", type=Path, nargs="+", default=None, metavar="TAR_GZ",
                        help="cinc2021: unpack these Challenge archives (WFDB_*.tar.gz) into DEST/cinc2021 instead "
                             "of downloading record by record (needs --download DEST)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    datasets = ["cinc2017", "mitdb"] if args.dataset == "all" else [args.dataset]
    if args.archives and (args.download is None or datasets != ["cinc2021"]):
        parser.error("--archives needs --dataset cinc2021 and --download DEST")
    if args.download is not None:
        for name in datasets:
            if name == "cinc2021":  # record by record, resuming; or the archives a user has
                if args.archives:
                    extract_cinc2021_archives(args.archives, args.download)
                else:
                    download_cinc2021(args.download, args.mirror)
                continue
            try:
                dataset_source(args.download, name)
                log.info("%s already under %s; not downloading", name, args.download)
            except (FileNotFoundError, ECGDataError):
                download_physionet(name, args.download, args.mirror)
        root = args.download
    else:
        root = find_data_root(args.data_dir)
    summary = {}
    for name in datasets:
        lead = args.lead if args.lead is not None else ("MLII" if name == "mitdb" else "")
        t0 = time.perf_counter()
        leads = tuple(args.leads.split(",")) if args.leads else (("all",) if name == "cinc2021" else ())
        params = PrepParams(fs=args.fs, lead="" if leads else lead, leads=leads,
                            missing_lead="substitute" if leads else "skip", normalize=args.normalize)
        cache = prepare_source(dataset_source(root, name), params, force=args.force)
        size = sum(p.stat().st_size for p in cache.path.iterdir())
        summary[name] = {"cache": str(cache.path), "records": len(cache), "leads": cache.lead_names,
                         "skipped": cache.skip_counts(),
                         "label_counts": cache.index["label_counts"], "prep_seconds": cache.index["prep_seconds"],
                         "seconds_now": round(time.perf_counter() - t0, 2), "megabytes": round(size / 2**20, 1)}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""DICOMweb for the runner (dicomweb-client): QIDO-RS to list a study's series, WADO-RS to fetch one, STOW-RS to store
the SR. Errors become one line naming the URL and the HTTP status."""

from __future__ import annotations

import os
from typing import Any


class PacsError(Exception):
    pass


#: dicomweb-client retries every failed request, a refused connection too, 5 times with exponential back-off
#: (30 s before "PACS down" is said); here 3 attempts, 0.5 s then 1 s apart, still for 429/408/503/504 as well.
RETRY_ATTEMPTS, RETRY_MULTIPLIER_MS = 3, 250


def _client(url: str):
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=url.rstrip("/"))
    client.set_http_retry_params(
        retry=True, max_attempts=RETRY_ATTEMPTS, wait_exponential_multiplier=RETRY_MULTIPLIER_MS
    )
    return client


def _fail(url: str, what: str, e: BaseException) -> PacsError:
    import requests

    if isinstance(e, requests.HTTPError) and e.response is not None:
        r = e.response
        return PacsError(f"{url}: {what} failed: HTTP {r.status_code} {r.reason}")
    if isinstance(e, requests.ConnectionError):
        return PacsError(f"{url}: {what} failed: cannot connect (is the PACS running?)")
    return PacsError(f"{url}: {what} failed: {type(e).__name__}: {e}")


def _value(d: dict, tag: str) -> str:
    v = d.get(tag, {}).get("Value") or [""]
    return str(v[0])


def list_series(url: str, study: str) -> list[tuple[str, str, int]]:
    """(series UID, modality, instance count) of the study, most instances first."""
    client = _client(url)
    try:
        found = client.search_for_series(study_instance_uid=study)
    except Exception as e:
        raise _fail(url, f"QIDO for study {study}", e) from None
    if not found:
        raise PacsError(f"{url}: QIDO: no series in study {study} (wrong study UID?)")
    out = []
    for s in found:
        uid = _value(s, "0020000E")
        try:
            n = len(client.search_for_instances(study_instance_uid=study, series_instance_uid=uid))
        except Exception as e:
            raise _fail(url, f"QIDO for the instances of series {uid}", e) from None
        out.append((uid, _value(s, "00080060"), n))
    out.sort(key=lambda t: (-t[2], t[0]))
    return out


def fetch_series(url: str, study: str, series: str | None, folder: str) -> tuple[str, str]:
    """Download one series of the study into ``folder`` (WADO-RS); returns (series UID, a note for the user)."""
    found = list_series(url, study)
    images = [s for s in found if s[1] != "SR"] or found
    if series:
        match = [s for s in found if s[0] == series]
        if not match and series.isdigit() and 1 <= int(series) <= len(images):
            match = [images[int(series) - 1]]
        if not match:
            raise PacsError(f"{url}: study {study} has no series {series}")
        chosen, how = match[0], "chosen"
    else:
        chosen, how = images[0], "the one with the most instances; pick another with --series"
    try:
        datasets = _client(url).retrieve_series(study_instance_uid=study, series_instance_uid=chosen[0])
    except Exception as e:
        raise _fail(url, f"WADO for series {chosen[0]}", e) from None
    os.makedirs(folder, exist_ok=True)
    for i, ds in enumerate(datasets):
        ds.save_as(os.path.join(folder, f"{i:05d}.dcm"), enforce_file_format=True)
    note = f"DICOMweb series {chosen[0]} ({chosen[1]}, {len(datasets)} instance(s)), {how}"
    return chosen[0], note


def store(url: str, dataset: Any) -> None:
    """STOW-RS one dataset, then QIDO that the PACS holds it; a refusal raises PacsError.

    The QIDO is needed: a PACS may answer 200 and list the instance as stored although it dropped it (Orthanc 1.10
    with DICOMweb 1.7 does so for an instance its ReceivedInstanceFilter refuses)."""
    client = _client(url)
    uid = str(dataset.SOPInstanceUID)
    try:
        answer = client.store_instances(datasets=[dataset])
    except Exception as e:
        raise _fail(url, "STOW", e) from None
    failed = getattr(answer, "FailedSOPSequence", None) or []
    if failed:
        reason = getattr(failed[0], "FailureReason", None)
        why = f" (failure reason 0x{int(reason):04X})" if reason is not None else ""
        raise PacsError(f"{url}: STOW failed: the PACS refused SOP instance {uid}{why}")
    try:
        held = client.search_for_instances(
            study_instance_uid=str(dataset.StudyInstanceUID), search_filters={"SOPInstanceUID": uid}
        )
    except Exception as e:
        raise _fail(url, "QIDO after the STOW", e) from None
    if not held:
        raise PacsError(
            f"{url}: STOW failed: the PACS answered HTTP 200 but does not hold SOP instance {uid} (refused by a filter?)"
        )

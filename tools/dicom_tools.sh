#!/bin/sh
# `make test`: the DICOM tools the export and PACS tests run (dciodvfy from dicom3tools; Orthanc with its DICOMweb
# plugin), installed with apt-get when missing and this runs as root (as CI does). Elsewhere:
#   sudo apt-get install -y dicom3tools orthanc orthanc-dicomweb
missing=""
command -v dciodvfy >/dev/null 2>&1 || missing="$missing dicom3tools"
command -v Orthanc >/dev/null 2>&1 || missing="$missing orthanc"
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$missing orthanc-dicomweb"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "error: missing Debian packages:$missing; install them with: sudo apt-get install -y$missing" >&2
  exit 1
fi
echo "== installing$missing (apt-get)"
(apt-get install -y --no-install-recommends $missing >/dev/null 2>&1 ||
  (apt-get update >/dev/null && apt-get install -y --no-install-recommends $missing >/dev/null)) ||
  { echo "error: apt-get install$missing failed" >&2; exit 1; }
# the Debian package starts a system Orthanc on 8042/4242; the tests run their own on free ports
(command -v service >/dev/null && service orthanc stop >/dev/null 2>&1) || true

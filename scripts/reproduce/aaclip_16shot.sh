#!/usr/bin/env bash
# AA-CLIP, 16-shot training: VisA -> the ten other data sets, MVTec -> VisA. Settings: common.sh, aaclip.sh.
source "$(dirname "$0")/aaclip.sh"
aaclip_tables 16

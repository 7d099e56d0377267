#!/usr/bin/env bash
# AA-CLIP, full-shot training (the paper's headline rows and the authors' released log): VisA -> the ten other data sets, MVTec -> VisA. Settings: common.sh, aaclip.sh.
source "$(dirname "$0")/aaclip.sh"
aaclip_tables full

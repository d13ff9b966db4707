#!/bin/sh
# The Bento image's setup_script (bentofile*.yaml), run after requirements/bento-*.txt is
# installed: resemblyzer only for its speaker-encoder weights (pretrained.pt, read by
# engine/speakers.py). Without --no-deps it would pull librosa, webrtcvad (a C build) and the
# obsolete `typing` backport, none of which our code uses; a requirements file cannot say
# --no-deps for one line.
set -eu
uv pip install --no-deps "resemblyzer==0.1.4"

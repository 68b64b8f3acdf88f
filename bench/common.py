"""What every bench script shares: the import path, quiet TensorFlow, offline weights, backbone options."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "KERAS_HOME" not in os.environ and (SHARED / "keras-models/models").is_dir():
    # Keras reads KERAS_HOME at import and writes keras.json there: a writable folder linking the weights
    home = Path(tempfile.mkdtemp(prefix="keras-home-"))
    (home / "models").symlink_to(SHARED / "keras-models/models")
    os.environ["KERAS_HOME"] = str(home)


def backbone_parser(description: str) -> argparse.ArgumentParser:
    """DATA_DIR and the backbone options of extract."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("data_dir")
    parser.add_argument("--backbone", default="MobileNetV2")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--layer", default=None)
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    return parser


def report(summary: str, result: dict[str, Any]) -> None:
    """The command line, a readable summary, and the JSON object as the last line."""
    print("command: python " + " ".join(sys.argv))
    print(summary)
    print(json.dumps(result))

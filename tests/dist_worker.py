"""Worker launched by tests/test_distributed.py under torchrun (2 processes, gloo)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import make_tokenizer, tiny_model  # noqa: E402
from safeneuron.config import IdentifyConfig  # noqa: E402
from safeneuron.distributed import world  # noqa: E402
from safeneuron.stages.identify import identify  # noqa: E402
from safeneuron.models import LoadedModel  # noqa: E402


def main() -> None:
    task, out = sys.argv[1], Path(sys.argv[2])
    if task == "identify":
        rank, size = world()
        assert size == 2, size
        lm = LoadedModel(tiny_model("llama"), make_tokenizer(), "tiny-llama", "<memory>")
        cfg = IdentifyConfig(max_prompts=30, batch_size=4, tau_es=0.5, by_category=True)
        result = identify(cfg, out, loaded=lm, progress=False)
        print(f"rank {rank}: union {result.union.count()}")


if __name__ == "__main__":
    main()

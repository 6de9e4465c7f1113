"""Tiny Gemma 3 models, tokenizer and LoRA adapters, built offline and deterministically.

The tests and `bakery-slurm demo` need checkpoints shaped like the real ones (a text-only
`Gemma3ForCausalLM` like 1B, a multimodal `Gemma3ForConditionalGeneration` like 4B/12B, and
all-linear LoRA adapters for each) without reaching the Hugging Face Hub. Everything here is
seeded: two builds with the same seed give byte-identical files.

Each builder writes through `fsutil.staging_dir`, so an output folder either is absent or holds a
complete build. torch, transformers and peft are imported inside the functions, so importing this
module (from the CLI, say) stays cheap.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Dict

from bakery_slurm.fsutil import staging_dir

#: Special tokens, in id order. <pad>, <eos>, <bos>, <unk> get ids 0..3, as in the real Gemma 3.
SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)

VOCAB_SIZE = 320

#: Gemma-like chat template: "assistant" is called "model", turns end with <end_of_turn>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

#: Training text for the tokenizer: English and Norwegian Bokmål, like the two adapters.
CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Good morning! How are you today?",
    "The weather in Oslo is cold and clear this week.",
    "Please translate this sentence into Norwegian.",
    "We merge two adapters into one model.",
    "A small model is enough for a test.",
    "The train leaves the station at nine o'clock.",
    "She reads a book about mountains and fjords.",
    "Can you help me write a short letter?",
    "Thank you very much for your answer.",
    "Den raske brune reven hopper over den late hunden.",
    "God morgen! Hvordan har du det i dag?",
    "Været i Oslo er kaldt og klart denne uken.",
    "Vennligst oversett denne setningen til engelsk.",
    "Vi slår sammen to adaptere til én modell.",
    "En liten modell er nok for en test.",
    "Toget går fra stasjonen klokken ni.",
    "Hun leser en bok om fjell og fjorder.",
    "Kan du hjelpe meg å skrive et kort brev?",
    "Tusen takk for svaret ditt.",
    "Bjørnen spiste blåbær ved sjøen på høsten.",
    "Æ, ø og å er bokstaver i det norske alfabetet.",
)

#: Multimodal tensor-name layouts a builder can write (see `multimodal_name`).
LAYOUTS = ("hub", "transformers", "prefixed")

_BASE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def build_tokenizer(out_dir: Path) -> None:
    """Train a byte-level BPE tokenizer on `CORPUS` and save it with `save_pretrained`.

    Parameters
    ----------
    out_dir : Path
        Folder to write `tokenizer.json` and `tokenizer_config.json` into (created if missing;
        existing files are overwritten). Not staged: the base builders call this on their own
        staging folder.

    Note
    ----
    The tokenizer is wrapped in `PreTrainedTokenizerFast`, not `GemmaTokenizerFast`, which would
    replace the byte-level pre-tokenizer. Like Gemma, it prepends <bos> to every encoded text;
    `apply_chat_template` tokenizes without special tokens, so chats get exactly one <bos>.
    Training is deterministic (checked across runs, thread counts and hash seeds).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, so any text encodes without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    bos_id = SPECIAL_TOKENS.index("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=list(SPECIAL_TOKENS[4:]),
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(str(out_dir))


def _load_tokenizer(folder: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def _text_config(tok):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        sliding_window=16,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


def _multimodal_config(tok, tie_word_embeddings: bool = True):
    from transformers import Gemma3Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        vision_use_head=False,
    )
    text = _text_config(tok)
    text.tie_word_embeddings = tie_word_embeddings
    return Gemma3Config(
        text_config=text,
        tie_word_embeddings=tie_word_embeddings,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
    )


def _build_base(out_dir: Path, seed: int, make_model: Callable, rename: Callable[[str], str]) -> None:
    """Write tokenizer + `make_model(tokenizer)` (seeded, bf16) into `out_dir`, via a staging folder."""
    import torch

    with staging_dir(Path(out_dir)) as tmp:
        build_tokenizer(tmp)
        tok = _load_tokenizer(tmp)  # the configs need its length and special-token ids
        # fork_rng: seed the weights without disturbing the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = make_model(tok)
        model.to(torch.bfloat16).save_pretrained(str(tmp))
        _rename_tensors(tmp / "model.safetensors", rename)


def _rename_tensors(path: Path, rename: Callable[[str], str]) -> None:
    """Rewrite one (small) safetensors file with every tensor name passed through `rename`."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    renamed = {rename(name): t for name, t in tensors.items()}
    if renamed.keys() != tensors.keys():
        save_file(renamed, str(path), metadata=metadata)


def build_text_base(out_dir: Path, seed: int = 0) -> Path:
    """Build a random tiny `Gemma3ForCausalLM` (Gemma 3 1B shape family) with its tokenizer.

    Parameters
    ----------
    out_dir : Path
        Folder to create; replaced if it exists.
    seed : int
        Seed for the weights.

    Returns
    -------
    Path
        `out_dir`, holding config.json, generation_config.json, model.safetensors (28 bf16 tensors,
        `model.embed_tokens.weight`, `model.layers.N.*`, `model.norm.weight`; no lm_head, it is tied)
        and the tokenizer files.
    """
    from transformers import Gemma3ForCausalLM

    _build_base(out_dir, seed, lambda tok: Gemma3ForCausalLM(_text_config(tok)), rename=lambda name: name)
    return Path(out_dir)


def multimodal_name(name: str, layout: str) -> str:
    """Map a tensor name as transformers 5.24 saves a from-config multimodal model to `layout`.

    Parameters
    ----------
    name : str
        A name as `Gemma3ForConditionalGeneration(config).save_pretrained` writes it:
        `language_model.model.*`, `vision_tower.*` (no `vision_model.`), `multi_modal_projector.*`.
    layout : str
        "hub": the published checkpoints' layout (`vision_tower.vision_model.*`), the one mergekit's
        gemma3vl definition and vLLM expect. "transformers": unchanged. "prefixed": the hub layout
        with an extra leading `model.`, as transformers 5.4-5.5 saved it (a bad layout for the
        repair stage to fix).

    Returns
    -------
    str
        The name in `layout`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if layout == "transformers":
        return name
    hub = re.sub(r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model.", name)
    return "model." + hub if layout == "prefixed" else hub


def build_multimodal_base(out_dir: Path, seed: int = 0, layout: str = "hub",
                          tie_word_embeddings: bool = True) -> Path:
    """Build a random tiny `Gemma3ForConditionalGeneration` (Gemma 3 4B/12B family) with its tokenizer.

    Parameters
    ----------
    out_dir : Path
        Folder to create; replaced if it exists.
    seed : int
        Seed for the weights.
    layout : str
        Tensor-name layout on disk, see `multimodal_name`. The default, "hub", is what real bases
        look like: `language_model.model.*`, `vision_tower.vision_model.*`, `multi_modal_projector.*`.
    tie_word_embeddings : bool
        False gives the model an lm_head of its own (`language_model.lm_head.weight` in the hub
        layout).

    Returns
    -------
    Path
        `out_dir`, holding config.json, generation_config.json, model.safetensors (51 bf16 tensors;
        no lm_head, it is tied to the embeddings, unless `tie_word_embeddings` is False) and the
        tokenizer files.
    """
    from transformers import Gemma3ForConditionalGeneration

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    _build_base(
        out_dir,
        seed,
        lambda tok: Gemma3ForConditionalGeneration(_multimodal_config(tok, tie_word_embeddings)),
        rename=lambda name: multimodal_name(name, layout),
    )
    return Path(out_dir)


def model_class(model_dir: Path):
    """The transformers class named by `model_dir/config.json` ("architectures"), for bf16 loading.

    Raises
    ------
    ValueError
        If the architecture is not one of the two Gemma 3 classes we bake.
    """
    import transformers

    arch = json.loads((Path(model_dir) / "config.json").read_text())["architectures"][0]
    if arch not in ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"):
        raise ValueError(f"{model_dir}: unsupported architecture {arch!r}")
    return getattr(transformers, arch)


def build_lora_adapter(base_dir: Path, out_dir: Path, seed: int, std: float = 0.05,
                       **lora_options: Any) -> Path:
    """Build a LoRA adapter (r=4, alpha=8, all-linear) for the base in `base_dir`, random non-zero.

    Parameters
    ----------
    base_dir : Path
        A base written by `build_text_base` or `build_multimodal_base`.
    out_dir : Path
        Folder to create (adapter_config.json, adapter_model.safetensors); replaced if it exists.
    seed : int
        Seed for the lora_A and lora_B values.
    std : float
        Standard deviation of those values. PEFT initialises lora_B to zero, which would make
        baking a no-op; 0.05 changes the tiny models' logits visibly.
    **lora_options
        Further `LoraConfig` settings (use_dora, use_rslora, target_modules, ...); every
        trainable adapter parameter is then randomised the same way.

    Returns
    -------
    Path
        `out_dir`.

    Note
    ----
    The adapter tensors are float32 (PEFT upcasts adapter weights even on a bf16 base). On the
    multimodal base, all-linear also adapts the vision tower (q/k/v/out_proj, fc1, fc2); lm_head
    and the projector are not adapted. `base_model_name_or_path` is "tiny-gemma3-<arch>", not a
    path (README.md names it too): load the base yourself and call `PeftModel.from_pretrained(base, out_dir)`.
    """
    import warnings

    import torch
    from peft import LoraConfig, get_peft_model

    cls = model_class(base_dir)
    base = cls.from_pretrained(str(base_dir), dtype=torch.bfloat16)
    # PEFT copies the base's path into adapter_config.json and README.md; use a neutral name so
    # the files do not depend on where the base was built.
    neutral_name = f"tiny-gemma3-{cls.__name__}"
    base.config._name_or_path = base.name_or_path = neutral_name
    with warnings.catch_warnings():
        # peft 0.21 calls a transformers method that 5.24 deprecates; nothing for us to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        model = get_peft_model(base, LoraConfig(**{"r": 4, "lora_alpha": 8,
                                                   "target_modules": "all-linear", **lora_options}))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # Sorted names: the values must not depend on module registration order.
        for name, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    config = model.peft_config["default"]
    config.base_model_name_or_path = neutral_name
    # PEFT stores the resolved modules as a set; a sorted list makes adapter_config.json stable
    # across PYTHONHASHSEED values.
    if isinstance(config.target_modules, (set, frozenset)):
        config.target_modules = sorted(config.target_modules)
    with staging_dir(Path(out_dir)) as tmp:
        # save_embedding_layers=False: "auto" looks base_model_name_or_path up on the Hub.
        model.save_pretrained(str(tmp), save_embedding_layers=False)
    return Path(out_dir)


def is_complete(folder: Path, files=_BASE_FILES) -> bool:
    """True if `folder` holds every file in `files` (default: those of a base)."""
    return all((Path(folder) / name).is_file() for name in files)


def build_demo_models(root: Path, layout: str = "hub") -> Dict[str, Dict[str, Path]]:
    """Build (or reuse) the demo bases and adapters under `root`.

    Parameters
    ----------
    root : Path
        Writes `bases/{text,multimodal}` and `adapters/{text,multimodal}/{eng,nob}`. A folder
        that is already complete is kept (builds are deterministic, so it holds the same bytes).
    layout : str
        Tensor-name layout of the multimodal base (see `multimodal_name`).

    Returns
    -------
    dict
        `{"text": {"base": Path, "eng": Path, "nob": Path}, "multimodal": {...}}`.
    """
    root = Path(root)
    builders = {"text": build_text_base, "multimodal": lambda out: build_multimodal_base(out, layout=layout)}
    adapter_seeds = {"eng": 1, "nob": 2}
    paths: Dict[str, Dict[str, Path]] = {}
    for kind, build_base in builders.items():
        base = root / "bases" / kind
        if not is_complete(base):
            build_base(base)
        paths[kind] = {"base": base}
        for lang, seed in adapter_seeds.items():
            adapter = root / "adapters" / kind / lang
            if not is_complete(adapter, _ADAPTER_FILES):
                build_lora_adapter(base, adapter, seed=seed)
            paths[kind][lang] = adapter
    return paths

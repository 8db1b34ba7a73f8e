"""EventGPT as a backend, imported from the user's own EventGPT checkout.

EventGPT (github.com/xifan-zhang/EventGPT) is not in transformers: its model
(`model/EventChatModel.py`, a Llama with a CLIP visual tower, an MLP
projector, a feature adaptor and spatio-temporal pooling of the event-frame
features), its conversation template and its event loaders live in its own
repository. This plugin imports them from a checkout (never a copy) and
drives them through the `tools.lib.backends.Backend` interface:

  --draft tools.plugins.eventgpt:make_backend:CKPT_DIR

with the checkout given by `EVENTGPT_REPO=DIR` (or `repo=DIR` in Python).

Loading follows the repository's `inference.py`: `AutoConfig` and the slow
tokenizer from the checkpoint, `EventChatModel.from_pretrained`, the event
patch (and, if configured, start/end) tokens added to the tokenizer, then
`resize_token_embeddings(len(tokenizer))`; the event processor is the visual
tower's CLIP image processor. The visual tower is the CLIP model named by the
checkpoint's `mm_visual_tower`, which the repository looks up under
`./checkpoints/` of the working directory (else on the hub); the plugin
resolves it to a directory instead (see `resolve_visual_tower`).

Prompts are the repository's `prepare_event_prompt` (conversation template
'eventgpt_v1') tokenized by its `tokenizer_event_token`. The event placeholder
is widened to one slot per event feature (frames + CLIP tokens), so the
attention mask spans the spliced sequence; the first forward call splices the
features in with the model's own `prepare_inputs_labels_for_multimodal`.
That backend, `EventGPTBackend`, and the event-stream check
`read_event_stream` live in tools/plugins/eventgpt_backend.py (importable
from here too); this module finds, imports and loads the checkout.

Draft media (a sample's `media.draft`):
  {"events": FILE.npy}  an event stream as the repository stores it (a
                        pickled dict of 1-D arrays x, y, p, t), turned into 5
                        event images by its `process_event_data`;
  {"image": FILE} or {"images": [FILES]}  event images, read with its
                        `load_image`, one feature frame per image.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types

import torch

from tools.lib import backends as bk
from tools.plugins.eventgpt_backend import (  # noqa: F401 (the plugin's names)
  CONV_MODE,
  EVENT_KEYS,
  NUM_EVENT_IMAGES,
  EventGPTBackend,
  read_event_stream,
)

REPO_ENV = "EVENTGPT_REPO"
VISUAL_TOWER_ENV = "EVENTGPT_VISUAL_TOWER"
# The files this plugin imports from a checkout.
REPO_FILES = (
  "model/EventChatModel.py",
  "common/common.py",
  "dataset/conversation.py",
  "dataset/constants.py",
)
# Top-level names the checkout's modules import each other by.
REPO_PACKAGES = ("model", "common", "dataset")
# What the plugin uses from each of those files.
REPO_API = {
  "model/EventChatModel.py": ("EventChatModel",),
  "common/common.py": (
    "tokenizer_event_token",
    "process_event_data",
    "load_image",
  ),
  "dataset/conversation.py": ("prepare_event_prompt", "conv_templates"),
  "dataset/constants.py": (
    "EVENT_TOKEN_INDEX",
    "DEFAULT_EVENT_TOKEN",
    "DEFAULT_EVENT_PATCH_TOKEN",
    "DEFAULT_EV_START_TOKEN",
    "DEFAULT_EV_END_TOKEN",
  ),
}
MODEL_METHODS = (
  "prepare_inputs_labels_for_multimodal",
  "get_model",
  "get_visual_tower",
)
CHECKED_COMMIT = "5987c0042f5647b167916e7e659a617cd00950d5"
MODEL_TYPE = "EventChat_llama"


def find_repo(repo: str | None = None) -> str:
  """The EventGPT checkout (`repo`, else $EVENTGPT_REPO), checked."""
  path = repo or os.environ.get(REPO_ENV)
  if not path:
    raise ValueError(
      f"no EventGPT checkout given: set {REPO_ENV}=DIR (a clone of "
      "github.com/xifan-zhang/EventGPT) or pass repo=DIR"
    )
  if not os.path.isdir(path):
    raise ValueError(f"EventGPT checkout {path}: not a directory")
  for rel in REPO_FILES:
    if not os.path.isfile(os.path.join(path, rel)):
      raise ValueError(
        f"EventGPT checkout {path}: {rel} is missing (not an EventGPT "
        "checkout, or a version this plugin does not know)"
      )
  return os.path.abspath(path)


def repo_commit(repo: str) -> str | None:
  """The checkout's git commit, or None when it is not a git work tree."""
  try:
    out = subprocess.run(
      ["git", "-C", repo, "rev-parse", "HEAD"],
      capture_output=True,
      text=True,
      check=True,
    )
  except (OSError, subprocess.CalledProcessError):
    return None
  return out.stdout.strip() or None


def _inside(module: types.ModuleType, repo: str) -> bool:
  paths = list(getattr(module, "__path__", []))
  paths += [getattr(module, "__file__", None) or ""]
  return any(os.path.abspath(p).startswith(repo + os.sep) for p in paths if p)


def import_repo(repo: str) -> types.SimpleNamespace:
  """Imports the checkout's model, template and loaders; returns them."""
  for name in REPO_PACKAGES:
    mod = sys.modules.get(name)
    if mod is not None and not _inside(mod, repo):
      where = getattr(mod, "__file__", None) or list(
        getattr(mod, "__path__", [])
      )
      raise ValueError(
        f"cannot import EventGPT from {repo}: a module {name!r} is already "
        f"imported from {where}"
      )
  # The checkout is not a package: its modules import each other as
  # top-level `model`, `common` and `dataset`, so its root must be on the
  # path (the only way to use its code without copying it).
  if repo not in sys.path:
    sys.path.insert(0, repo)
  try:
    chat = importlib.import_module("model.EventChatModel")
    common = importlib.import_module("common.common")
    conversation = importlib.import_module("dataset.conversation")
    constants = importlib.import_module("dataset.constants")
  except ImportError as e:
    raise ValueError(
      f"cannot import EventGPT from {repo}: {e} (install the extra: "
      "pip install -e '.[tools,eventgpt]')"
    ) from e
  for name in REPO_PACKAGES:
    if not _inside(sys.modules[name], repo):
      raise ValueError(
        f"cannot import EventGPT from {repo}: {name!r} resolved to "
        f"{sys.modules[name]!r}"
      )
  modules = {
    "model/EventChatModel.py": chat,
    "common/common.py": common,
    "dataset/conversation.py": conversation,
    "dataset/constants.py": constants,
  }
  api = {}
  for rel, names in REPO_API.items():
    for name in names:
      if not hasattr(modules[rel], name):
        raise ValueError(
          f"EventGPT checkout {repo}: {rel} defines no {name!r} (a version "
          f"this plugin does not know; it was checked at {CHECKED_COMMIT})"
        )
      api[name] = getattr(modules[rel], name)
  for name in MODEL_METHODS:
    if not callable(getattr(api["EventChatModel"], name, None)):
      raise ValueError(
        f"EventGPT checkout {repo}: model/EventChatModel.py's EventChatModel "
        f"has no {name!r} (a version this plugin does not know; it was "
        f"checked at {CHECKED_COMMIT})"
      )
  return types.SimpleNamespace(**api)


def resolve_visual_tower(
  name: str, *, ckpt: str, repo: str, visual_tower: str | None = None
) -> str:
  """The CLIP visual tower's directory.

  Looked for, in order: `visual_tower` (else $EVENTGPT_VISUAL_TOWER), the
  config's `mm_visual_tower` as a path, `REPO/checkpoints/NAME` (where the
  repository looks when run from its root), `NAME` beside the checkpoint
  directory, and a hub id already in the local Hugging Face cache (nothing
  is downloaded). A directory must hold config.json and
  preprocessor_config.json.
  """
  given = visual_tower or os.environ.get(VISUAL_TOWER_ENV)
  if given:
    candidates = [given]
  else:
    parent = os.path.dirname(os.path.abspath(ckpt))
    candidates = [
      name,
      os.path.join(repo, "checkpoints", name),
      os.path.join(parent, name),
      os.path.join(parent, os.path.basename(name.rstrip("/"))),
    ]
  needed = ("config.json", "preprocessor_config.json")
  for path in dict.fromkeys(candidates):
    if os.path.isdir(path):
      missing = [f for f in needed if not os.path.isfile(os.path.join(path, f))]
      if missing:
        raise ValueError(
          f"EventGPT visual tower {path}: {', '.join(missing)} missing (a "
          "CLIP vision model and its image processor are expected)"
        )
      return os.path.abspath(path)
  if given:
    raise ValueError(f"EventGPT visual tower {given}: not a directory")
  cached = _hub_cache_dir(name)
  if cached is not None:
    return cached
  raise ValueError(
    f"EventGPT visual tower {name!r} (mm_visual_tower in "
    f"{os.path.join(ckpt, 'config.json')}) not found; looked in "
    f"{', '.join(dict.fromkeys(candidates))} and the local hub cache; "
    f"download that CLIP model and set {VISUAL_TOWER_ENV}=DIR"
  )


def _hub_cache_dir(name: str) -> str | None:
  """The local Hugging Face cache snapshot of hub id `name`, if complete."""
  if os.path.isabs(name) or name.count("/") != 1:
    return None
  try:
    from huggingface_hub import snapshot_download

    path = snapshot_download(
      name, local_files_only=True, allow_patterns=["*.json"]
    )
  except Exception:  # noqa: BLE001 - not cached (or no hub client): not found
    return None
  needed = ("config.json", "preprocessor_config.json")
  if all(os.path.isfile(os.path.join(path, f)) for f in needed):
    return path
  return None


def _loader_class(model_class):
  """`model_class` made loadable by transformers >= 5.

  transformers 5 builds a model on the meta device before loading its
  weights, but EventGPT's visual tower calls `CLIPVisionModel.from_pretrained`
  inside `__init__`, which refuses to run there; the subclass drops the meta
  device (the model is randomly initialised, then the checkpoint overwrites
  it). After loading, transformers 5 also re-creates every non-persistent
  buffer empty and re-initialises it only where a module is not marked as
  already loaded, which leaves the CLIP tower's position ids as garbage; the
  subclass keeps the values `__init__` computed and puts them back. Older
  transformers call neither hook and lose nothing.
  """

  class EventChatModelLoader(model_class):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      persistent = set(self.state_dict())
      self.constructed_buffers = {
        name: buf.detach().clone()
        for name, buf in self.named_buffers()
        if name not in persistent
      }

    @classmethod
    def get_init_context(cls, *args, **kwargs):
      return [
        c
        for c in super().get_init_context(*args, **kwargs)
        if not (isinstance(c, torch.device) and c.type == "meta")
      ]

    @torch.no_grad()
    def restore_constructed_buffers(self) -> None:
      for name, value in self.constructed_buffers.items():
        self.get_buffer(name).copy_(value)
      self.constructed_buffers = {}

  return EventChatModelLoader


def load_tokenizer_and_model(
  ckpt: str, api: types.SimpleNamespace, config, dtype: torch.dtype
):
  """Tokenizer + model loaded as the checkout's inference.py does."""
  from transformers import AutoTokenizer

  try:
    tokenizer = AutoTokenizer.from_pretrained(ckpt, use_fast=False)
    model, info = _loader_class(api.EventChatModel).from_pretrained(
      ckpt, config=config, dtype=dtype, output_loading_info=True
    )
    model.restore_constructed_buffers()
  except OSError as e:
    raise ValueError(f"EventGPT checkpoint {ckpt}: cannot load ({e})") from e
  missing = list(info.get("missing_keys", []))
  if missing:
    raise ValueError(
      f"EventGPT checkpoint {ckpt}: no weights for {len(missing)} "
      f"parameters, e.g. {sorted(missing)[:3]} (a different EventGPT "
      "version?)"
    )
  if getattr(config, "mm_use_im_patch_token", True):
    tokenizer.add_tokens([api.DEFAULT_EVENT_PATCH_TOKEN], special_tokens=True)
  if getattr(config, "mm_use_im_start_end", False):
    tokenizer.add_tokens(
      [api.DEFAULT_EV_START_TOKEN, api.DEFAULT_EV_END_TOKEN],
      special_tokens=True,
    )
  rows = model.get_input_embeddings().weight.shape[0]
  if len(tokenizer) != rows:
    print(
      f"EventGPT {ckpt}: tokenizer has {len(tokenizer)} tokens, the "
      f"embeddings {rows}; resized as inference.py does (new rows are "
      "freshly initialised)",
      file=sys.stderr,
    )
  model.resize_token_embeddings(len(tokenizer))
  return tokenizer, model


def make_backend(
  arg: str | None,
  *,
  device="cpu",
  dtype="float32",
  repo: str | None = None,
  visual_tower: str | None = None,
  conv_mode: str = CONV_MODE,
  prompt_template: str | None = None,
) -> EventGPTBackend:
  """Plugin factory: `tools.plugins.eventgpt:make_backend:CKPT_DIR`.

  `repo`: the EventGPT checkout (default $EVENTGPT_REPO); `visual_tower`:
  the CLIP directory (default $EVENTGPT_VISUAL_TOWER, else looked up, see
  `resolve_visual_tower`); `prompt_template`: replaces the conversation
  template (must contain '<event>' and '{question}').
  """
  from transformers import AutoConfig

  repo = find_repo(repo)
  if not arg:
    raise ValueError(
      "EventGPT plugin needs the checkpoint directory: "
      "tools.plugins.eventgpt:make_backend:CKPT_DIR"
    )
  ckpt = arg
  if not os.path.isdir(ckpt):
    raise ValueError(f"EventGPT checkpoint {ckpt}: not a directory")
  config_path = os.path.join(ckpt, "config.json")
  if not os.path.isfile(config_path):
    raise ValueError(
      f"EventGPT checkpoint {config_path}: missing (a checkpoint directory "
      "holds config.json, the weights and the tokenizer)"
    )
  api = import_repo(repo)  # registers the EventChat_llama config type
  try:
    config = AutoConfig.from_pretrained(ckpt)
  except (OSError, ValueError) as e:
    raise ValueError(f"{config_path}: cannot be read ({e})") from e
  if getattr(config, "model_type", None) != MODEL_TYPE:
    raise ValueError(
      f"{config_path}: model_type {getattr(config, 'model_type', None)!r}, "
      f"expected {MODEL_TYPE!r} (an EventGPT checkpoint)"
    )
  for key in ("mm_visual_tower", "event_feature_adaptor"):
    if not getattr(config, key, None):
      raise ValueError(
        f"{config_path}: no {key!r}; EventGPT's event path needs the visual "
        "tower and the feature adaptor"
      )
  tower_name = config.mm_visual_tower
  # The repository joins the name onto ./checkpoints; an absolute directory
  # survives that join, so the tower loads from where it really is.
  config.mm_visual_tower = resolve_visual_tower(
    tower_name, ckpt=ckpt, repo=repo, visual_tower=visual_tower
  )
  dt = bk.torch_dtype(dtype)
  tokenizer, model = load_tokenizer_and_model(ckpt, api, config, dt)
  # One dtype for the whole model: the repository builds the visual tower
  # and projector in bfloat16 whatever the requested dtype.
  model = model.to(device=device, dtype=dt).eval()
  source = {
    "eventgpt_repo": repo,
    "eventgpt_commit": repo_commit(repo),
    "visual_tower": config.mm_visual_tower,
    "mm_visual_tower": tower_name,
  }
  return EventGPTBackend(
    model,
    tokenizer,
    model.get_visual_tower().event_processor,
    api,
    model_id=ckpt,
    conv_mode=conv_mode,
    prompt_template=prompt_template,
    source=source,
  )

"""Vision backbones for extract.py: a name -> model, its library's preprocessing, default layer and pooling.
Weights are only ever read from local files; nothing here downloads.

    import backbones
    bb = backbones.build("dinov2", weights="random")          # untrained (tests); or a PATH; or "" = local cache
    bb.features(x, ["output", "blocks.6"], "auto")            # {layer: (B, d) float32}, one forward pass

A spec is a registry name (REGISTRY) or LIBRARY:ARCH with LIBRARY timm | open_clip | torchvision, e.g.
"timm:vit_small_patch14_reg4_dinov2.lvd142m", "open_clip:ViT-B-16@openai", "torchvision:resnet18".

Weights, in order: --weights random (no weights); --weights PATH (must exist); otherwise the first local file of
  WEIGHTS_DIR/<name>.{safetensors,pt,pth,bin}  (fetch_data.py --only weights puts registry weights there)
  the Hugging Face cache  $HF_HUB_CACHE or ~/.cache/huggingface/hub/models--ORG--REPO/snapshots/*/FILE
  torch's hub cache       $TORCH_HOME or ~/.cache/torch/hub/checkpoints/FILE (torchvision)
The file found is passed to the library as a local path, so its download code never runs; the Hugging Face
offline variables are set before any library is imported, and sockets are refused while a model is built.
"""
import contextlib
import glob
import os
import socket

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_k] = "1"  # before huggingface_hub is imported (it reads these once, at import)

WEIGHT_EXTS = (".safetensors", ".pt", ".pth", ".bin")
POOLINGS = ("auto", "head", "cls", "mean", "max", "flatten")  # auto: head for 'output', else cls (ViTs) / mean
TIMM_FILES = ("model.safetensors", "pytorch_model.bin")
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

# name: library, architecture (+ tag), default layer ("output" = the library's own pooled embedding) and pooling,
# and where its weights come from. Layers are module names of the model (visual tower for open_clip).
REGISTRY = {
    "clip": dict(library="open_clip", arch="ViT-B-32", tag="datacomp_xl_s13b_b90k",
                 layer="transformer.resblocks.11", pooling="cls", hub="laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K",
                 files=OPEN_CLIP_FILES,
                 about="residual stream after block 11, CLS token (768-d): the input of ViT-Prisma's CLIP SAEs"),
    "dinov2": dict(library="timm", arch="vit_base_patch14_reg4_dinov2.lvd142m", layer="output", pooling="head",
                   about="CLS token after the final norm (timm global_pool=token), 518 px"),
    "dinov3": dict(library="timm", arch="vit_base_patch16_dinov3.lvd1689m", layer="output", pooling="head",
                   about="mean of patch tokens + fc_norm (timm global_pool=avg), 256 px"),
    "siglip2": dict(library="timm", arch="vit_base_patch16_siglip_256.v2_webli", layer="output", pooling="head",
                    about="attention-pool head output (timm global_pool=map), 256 px"),
    "mae": dict(library="timm", arch="vit_large_patch16_224.mae", layer="output", pooling="head",
                about="ViT-L, CLS token after the final norm (timm global_pool=token), 1024-d"),
    "resnet50": dict(library="torchvision", arch="resnet50", layer="output", pooling="head",
                     files=("resnet50-11ad3fa6.pth",),
                     about="global average pool, the input of fc (2048-d); IMAGENET1K_V2 weights"),
}


class WeightsError(ValueError):
    """Weights that are missing or unusable; the message names the file and where to put it."""


def parse_spec(spec):
    """Registry name or LIBRARY:ARCH[@TAG] -> dict(name, library, arch, tag, layer, pooling, hub, files, about)."""
    if spec in REGISTRY:
        s = dict(REGISTRY[spec], name=spec)
    elif ":" in spec and spec.split(":", 1)[0] in ("timm", "open_clip", "torchvision"):
        lib, arch = spec.split(":", 1)
        tag = ""
        if lib == "open_clip" and "@" in arch:
            arch, tag = arch.split("@", 1)
        s = dict(library=lib, arch=arch, tag=tag, layer="output", pooling="auto", name=spec, about="")
    else:
        raise WeightsError(f"unknown backbone {spec!r}; expected one of {sorted(REGISTRY)} or "
                           f"timm:ARCH, open_clip:ARCH[@TAG], torchvision:ARCH")
    s.setdefault("tag", "")
    if s["library"] == "timm":
        s.setdefault("files", TIMM_FILES)
        if "." in s["arch"]:  # timm's hub repos are named after the pretrained tag: timm/<arch>.<tag>
            s.setdefault("hub", f"timm/{s['arch']}")
    s.setdefault("hub", "")
    s.setdefault("files", OPEN_CLIP_FILES if s["library"] == "open_clip" else ())
    return s


def safe_name(name):
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)


def hf_hub_cache():
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return os.path.join(home, "hub")


def torch_hub_checkpoints():
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch")
    return os.path.join(home, "hub", "checkpoints")


def _hf_cached(repo, files):
    """A file of a Hugging Face repo already in the local hub cache (the revision refs/main points to first)."""
    folder = os.path.join(hf_hub_cache(), "models--" + repo.strip("/").replace("/", "--"))
    revs = []
    ref = os.path.join(folder, "refs", "main")
    if os.path.isfile(ref):
        with open(ref) as fh:
            revs.append(fh.read().strip())
    revs += sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "snapshots", "*")))
    for rev in revs:
        for f in files:
            p = os.path.join(folder, "snapshots", rev, f)
            if os.path.isfile(p):
                return p
    return None


def _library_sources(s):
    """Fill hub/files of a LIBRARY:ARCH spec from the library's own pretrained config (imports the library)."""
    if s["library"] == "timm" and not s["hub"]:
        import timm
        cfg = timm.models.get_pretrained_cfg(s["arch"])
        s["hub"] = (getattr(cfg, "hf_hub_id", None) or "") if cfg else ""
    elif s["library"] == "open_clip" and s["tag"] and not s["hub"]:
        import open_clip
        cfg = open_clip.get_pretrained_cfg(s["arch"], s["tag"]) or {}
        s["hub"] = cfg.get("hf_hub", "").strip("/")
        if not s["hub"] and cfg.get("url"):
            s["cache_file"] = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
    elif s["library"] == "torchvision" and not s["files"]:
        import torchvision
        try:
            w = torchvision.models.get_model_weights(s["arch"]).DEFAULT
            s["files"] = (os.path.basename(w.url),)
        except Exception:
            pass
    return s


def candidates(s, weights_dir):
    """Every local path the weights of spec s may be at, in search order (for lookup and for the error)."""
    out = [os.path.join(weights_dir, safe_name(s["name"]) + e) for e in WEIGHT_EXTS]
    if s["hub"]:
        out += [os.path.join(hf_hub_cache(), "models--" + s["hub"].replace("/", "--"), "snapshots", "<rev>", f)
                for f in s["files"]]
    if s["library"] == "torchvision":
        out += [os.path.join(torch_hub_checkpoints(), f) for f in s["files"]]
    if s.get("cache_file"):
        out.append(s["cache_file"])
    return out


def resolve_weights(spec, weights="", weights_dir="data/weights", deep=True):
    """-> (local weights path or None for random, human-readable source). Raises WeightsError naming the
    file(s) and where to put them. deep=False never imports a library (a registry name needs none)."""
    s = parse_spec(spec) if isinstance(spec, str) else spec
    if weights == "random":
        return None, "random"
    if weights:
        if not os.path.isfile(weights):
            raise WeightsError(f"--weights {weights}: file not found. Put the {s['name']} weights file there "
                               f"(a state dict: .safetensors/.pt/.pth/.bin), pass another path, or "
                               f"--weights random for an untrained network")
        return weights, weights
    if s["library"] == "open_clip" and not s["tag"] and s["name"] not in REGISTRY:
        raise WeightsError(f"{s['name']}: open_clip needs pretrained weights named: {s['name']}@TAG (e.g. "
                           f"open_clip:ViT-B-32@openai), --weights PATH, or --weights random")
    if deep:
        s = _library_sources(s)
    for p in candidates(s, weights_dir):
        if "<rev>" in p:
            found = _hf_cached(s["hub"], s["files"])
            if found:
                return found, f"{found} (Hugging Face cache)"
        elif os.path.isfile(p):
            return p, p
    if not deep and s["name"] not in REGISTRY:  # LIBRARY:ARCH: the library knows more places to look
        return resolve_weights(s, weights, weights_dir, deep=True)
    where = "\n  ".join(candidates(s, weights_dir))
    fetch = f"python fetch_data.py --name {s['name']}  (or " if s["name"] in REGISTRY else "("
    how = (f"\nOn a machine with network: {fetch}huggingface-cli download {s['hub']} {s['files'][0]})"
           if s["hub"] else "")
    raise WeightsError(f"no local weights for backbone {s['name']!r} ({s['library']} {s['arch']}"
                       f"{'@' + s['tag'] if s['tag'] else ''}); nothing is downloaded. Expected one of:\n  {where}"
                       f"{how}\nor pass --weights PATH, or --weights random for an untrained network.")


@contextlib.contextmanager
def no_network(what):
    """Refuse every IP connection while `what` runs: a library that tries to download fails at once, by name."""
    orig = socket.socket.connect

    def connect(sock, addr):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise WeightsError(f"{what}: a network connection to {addr} was attempted; extract.py never downloads "
                               f"(pass --weights PATH or --weights random)")
        return orig(sock, addr)

    socket.socket.connect = connect
    try:
        yield
    finally:
        socket.socket.connect = orig


def load_state_dict(path):
    """A state dict from .safetensors or a torch file (unwrapping {'state_dict': ...} / {'model': ...})."""
    import torch
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    return sd


# --------------------------------------------------------------------------------------------------- models

class _Stop(Exception):
    """Raised by the last hook that is needed, so the rest of the network never runs."""


class Backbone:
    """A vision model in eval mode, its preprocessing (PIL RGB -> (3, H, W) float tensor) and layer capture."""

    def __init__(self, spec, model, transform, output_fn, output_pooling, num_prefix_tokens, weights):
        self.spec, self.model, self.transform = spec, model.eval(), transform
        self.output_fn, self.output_pooling = output_fn, output_pooling
        self.num_prefix_tokens, self.weights = num_prefix_tokens, weights
        self.name = spec["name"]

    def to(self, device):
        self.model.to(device)
        return self

    def layer_names(self):
        return ["output"] + [n for n, _ in self.model.named_modules() if n]

    def pool(self, t, pooling, layer):
        """(B, ...) activation -> ((B, d) float32, pooling used). Tokens are (B, T, D), batch first; feature
        maps (B, C, H, W). 'mean'/'max' over tokens skip the prefix (class/register) tokens."""
        if isinstance(t, (tuple, list)):
            t = t[0]
        if not hasattr(t, "ndim"):
            raise WeightsError(f"layer {layer!r} returns {type(t).__name__}, not a tensor; pick another module")
        if t.ndim == 2:  # already one vector per image (a pooled output, a Linear): nothing to pool
            return t.float(), "none"
        if pooling in ("auto", "head"):  # head = the library's pooling, which only the 'output' layer has
            pooling = "mean" if t.ndim == 4 else "cls" if self.num_prefix_tokens > 0 else "mean"
        if pooling == "flatten":
            return t.flatten(1).float(), pooling
        if t.ndim == 3:
            body = t[:, self.num_prefix_tokens:] if t.shape[1] > self.num_prefix_tokens else t
            if pooling == "cls":
                if self.num_prefix_tokens < 1:
                    raise WeightsError(f"layer {layer!r}: this model has no class token; use --pooling mean")
                return t[:, 0].float(), pooling
            return (body.mean(1) if pooling == "mean" else body.amax(1)).float(), pooling
        if t.ndim == 4:
            if pooling == "cls":
                raise WeightsError(f"layer {layer!r} is a (batch, C, H, W) feature map; use --pooling mean|max|flatten")
            return (t.mean((2, 3)) if pooling == "mean" else t.amax((2, 3))).float(), pooling
        raise WeightsError(f"layer {layer!r} has {t.ndim}-d output {tuple(t.shape)}; use --pooling flatten")

    def features(self, x, layers, pooling="auto"):
        """x (B, 3, H, W) -> {layer: (B, d) float32}, one forward pass (two when a layer comes after the embedding,
        e.g. the classifier); layers are 'output' (the library's pooled embedding) or module names, captured by
        forward hooks. Returns (features, pooling used per layer)."""
        import torch
        mods = dict(self.model.named_modules())
        hooked = [l for l in layers if l != "output"]
        missing = [l for l in hooked if l not in mods]
        if missing:
            import difflib
            names = self.layer_names()
            near = difflib.get_close_matches(missing[0], names, n=6, cutoff=0.5) or names[:3] + names[-3:]
            raise WeightsError(f"{self.name}: no layer named {missing[0]!r}; near ones: {near} (all {len(names)}: "
                               f"python extract.py --backbone {self.name} --list-layers)")
        got, handles = {}, []
        need_output = "output" in layers

        def make_hook(name):
            def hook(mod, inp, out):
                got.setdefault(name, out)
                if all(h in got for h in hooked) and (not need_output or "output" in got):
                    raise _Stop
            return hook

        for name in hooked:
            handles.append(mods[name].register_forward_hook(make_hook(name)))
        try:
            with torch.inference_mode():
                try:
                    out = self.output_fn(x)
                    if need_output:
                        got["output"] = out
                except _Stop:
                    pass
                if any(h not in got for h in hooked):  # a module past the embedding (the classifier): the
                    try:                               # library's full forward, which runs every module
                        self.model(x)
                    except _Stop:
                        pass
        finally:
            for h in handles:
                h.remove()
        unrun = [h for h in hooked if h not in got]
        if unrun:
            raise WeightsError(f"{self.name}: layer {unrun[0]!r} is not run by the model's forward pass; pick another")
        feats, used = {}, {}
        for l in layers:
            feats[l], used[l] = self.pool(got[l], pooling, l)
            if l == "output" and used[l] == "none":
                used[l] = self.output_pooling  # the library pooled it
        return feats, used


def _timm(s, path):
    import timm
    from timm.data import create_transform, resolve_data_config
    if path:  # timm's own loader with a local file: its checkpoint filters (e.g. original DINOv2 keys) still apply
        model = timm.create_model(s["arch"], pretrained=True, pretrained_cfg_overlay=dict(file=path))
    else:
        model = timm.create_model(s["arch"], pretrained=False)
    transform = create_transform(**resolve_data_config(model=model))
    out = lambda x: model.forward_head(model.forward_features(x), pre_logits=True)  # noqa: E731
    return model, transform, out, f"timm global_pool={getattr(model, 'global_pool', '') or 'none'}", \
        int(getattr(model, "num_prefix_tokens", 0))


def _open_clip(s, path):
    import open_clip
    arch = s["arch"]
    if arch.endswith(".json"):  # a local model config (e.g. a tiny test architecture)
        open_clip.add_model_config(arch)
        arch = os.path.splitext(os.path.basename(arch))[0]
    kw = {}
    if s["tag"]:
        pc = open_clip.get_pretrained_cfg(arch, s["tag"])
        if not pc:
            raise WeightsError(f"{s['name']}: open_clip has no pretrained tag {s['tag']!r} for {arch}; tags: "
                               f"{open_clip.list_pretrained_tags_by_model(arch)}")
        # a file path skips open_clip's tag lookup, so carry the tag's preprocessing and activation over
        kw.update({f"image_{k}": pc[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pc})
        if pc.get("quick_gelu"):
            kw["force_quick_gelu"] = True
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=path or None, **kw)
    visual = model.visual  # the image tower is all extraction needs; the text tower is dropped
    del model
    prefix = 1 if getattr(visual, "class_embedding", None) is not None else 0
    return visual, preprocess, visual, "open_clip image embedding", prefix


def _torchvision(s, path):
    import torch
    import torchvision
    try:
        w = torchvision.models.get_model_weights(s["arch"]).DEFAULT
    except Exception:
        w = None
    model = torchvision.models.get_model(s["arch"], weights=None)
    if path:
        model.load_state_dict(load_state_dict(path))
    if w is not None:
        transform = w.transforms()
    else:
        from torchvision import transforms as T
        transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                               T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]

    def out(x):  # the input of the last Linear (the classifier): penultimate features of any torchvision net
        if not linears:
            return model(x)
        box = {}

        def pre(mod, inp):
            box["x"] = inp[0]
            raise _Stop

        h = linears[-1].register_forward_pre_hook(pre)
        try:
            model(x)
        except _Stop:
            if "x" not in box:  # a layer hook stopped the pass earlier: features() handles it
                raise
        finally:
            h.remove()
        return box["x"]

    return model, transform, out, "torchvision: input of the classifier", \
        1 if s["arch"].startswith("vit_") else 0


def _brief(e, width=240):
    """An exception's message with each line cut to `width` characters: a state-dict mismatch lists every key
    of the model and of the file, thousands of characters that bury the first few (which are the useful ones)."""
    lines = []
    for line in str(e).splitlines():
        if len(line) > width:
            n = line.count('"') // 2  # torch's load_state_dict quotes each key
            line = line[:width] + (f" ... ({n} keys in all)" if n else " ...")
        lines.append(line)
    return "\n".join(lines)


def build(spec, weights="", weights_dir="data/weights", device="cpu"):
    """Backbone for spec (module docstring), weights resolved by resolve_weights, in eval mode on device."""
    s = parse_spec(spec)
    path, source = resolve_weights(s, weights, weights_dir)
    builder = {"timm": _timm, "open_clip": _open_clip, "torchvision": _torchvision}[s["library"]]
    with no_network(f"building {s['name']}"):
        try:
            model, transform, out, out_pool, prefix = builder(s, path)
        except WeightsError:
            raise
        except (RuntimeError, KeyError, ValueError) as e:
            if path:
                raise WeightsError(f"{path}: could not load as {s['library']} {s['arch']} weights ({_brief(e)}); "
                                   f"a state dict with other key names must be converted to the library's names "
                                   f"first") from None
            raise
    for p in model.parameters():
        p.requires_grad_(False)
    return Backbone(s, model, transform, out, out_pool, prefix, source).to(device)

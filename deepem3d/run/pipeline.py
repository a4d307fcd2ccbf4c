"""The pipeline file: one YAML file that names a whole run, checked whole before anything runs.

    version: 1
    output: results/run1               # the output root: every layer the run writes is under it
                                       # (relative paths: from the current folder, as on the
                                       # command line, not from the file's)
    image: gs://bucket/em/image        # or `sample:isbi2012`, the embedded sample (written first)
    ground_truth: gs://bucket/em/gt    # optional: scores in report.json (`sample:isbi2012` too),
                                       # at its mip of the map's voxel size
    map: gs://bucket/em/affinity       # optional: segment an existing map instead of inferring
    products: [map, segmentation, downsample]   # default: [map, segmentation]
    inference:                         # the `deepem3d infer` options, spelled with underscores
      model: isbi2012-small-affinity   # a shipped name, a checkpoint path or URL, or a list
      tta: 1
      task_shape: [1024, 1024, 16]
      sharded: true                    # a shard file per task (chunks 256 x 256 x 4 here)
      queue: inference                 # routes the stage to that queue (default: `inference`
                                       # when the file defines it, else `default`)
    segmentation:                      # the `deepem3d segment` options; without method and
      method: mean                     # threshold, the settings not given are those the
      threshold: 0.55                  # model records (shipped models do); with them, sigma
      sigma: 4                         # and dust_size not given are 0
      max_task_memory: 24GiB           # refuse a plan whose largest task needs more
      sharded: true                    # a shard file per block (segmentation, smoothed map)
    downsample:
      layers: [image, segmentation]    # default: the segmentation (and the image when it is
                                       # the embedded sample)
    meshes:                            # with the `meshes` product: the `deepem3d mesh` options
      mip: 2                           # default: the first near-isotropic mip
      sharded: true                    # multi-resolution shard files (large volumes)
    skeletons:                         # with the `skeletons` product: `deepem3d skeleton`'s
      min_cable_nm: 1000
    evaluate:                          # with `ground_truth`: where the score is taken
      bounds: [0, 0, 20, 512, 512, 30] # default: the ground truth within the segmentation
    queues:
      default: fq://results/run1/queue
      inference: sqs://em-gpu
      large: {url: sqs://em-highmem, min_memory: 6GiB}   # `default` stages whose largest
                                                          # task needs more go here
      # max_memory: the most a task may add to a worker of the queue's pool (its pods' limit
      # less the worker itself and /tmp): a stage routed there with a larger task is refused

Each step's keys are the tuples below (INFERENCE_KEYS and its peers): its command's options
spelled with underscores, `amp: false` for `--no-amp`, and `queue`; the layers a step reads and
writes are the file's own (`image`, `output`, `map`), so their options (a segmentation's `mip`,
downsample's `bounds`) are not keys.

Bounds given for inference alone are the segmentation's too (a run segments what it
inferred; its meshes read the rest of the layer as 0, and skeletons, which cannot, are
refused). A product needs the one before it (a segmentation needs a map: the `map` product or
a `map` layer; downsampling the segmentation needs it). Every mistake is a one-line InputError
naming the key, raised before any layer is written or any task is created (but the embedded
sample's two layers, which a run over `sample:isbi2012` writes first, complete, to read its
geometry).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from deepem3d.axes import LARGEST_COORDINATE
from deepem3d.errors import InputError
from deepem3d.units import INT64_MAX, parse_bytes

if TYPE_CHECKING:
    import yaml

VERSION = 1
SAMPLE = "sample:isbi2012"
PRODUCTS = ("map", "segmentation", "downsample", "meshes", "skeletons")
TOP_KEYS = ("version", "output", "image", "ground_truth", "map", "products", "inference",
            "segmentation", "downsample", "meshes", "skeletons", "evaluate", "queues")
INFERENCE_KEYS = ("model", "tta", "task_shape", "chunk_size", "bounds", "mip", "patch_size",
                  "patch_output", "overlap", "batch_size", "window", "device", "threads", "amp",
                  "float32", "fill_missing", "mask", "mask_mip", "force", "sharded", "queue")
SEGMENTATION_KEYS = ("method", "threshold", "sigma", "dust_size", "dust_mode", "task_shape",
                     "chunk_size", "bounds", "edges_per_voxel", "max_task_memory", "sharded",
                     "queue")
DOWNSAMPLE_KEYS = ("layers", "num_mips", "factor", "memory", "fill_missing", "sparse", "queue")
MESHES_KEYS = ("mip", "task_shape", "sharded", "spatial_index", "queue")
SKELETONS_KEYS = ("mip", "task_shape", "sharded", "spatial_index", "dust_threshold",
                  "min_cable_nm", "tick_threshold", "queue")
OBJECT_PRODUCTS = ("meshes", "skeletons")  # made of the segmentation by igneous
EVALUATE_KEYS = ("bounds",)
SECTION_KEYS = {"inference": INFERENCE_KEYS, "segmentation": SEGMENTATION_KEYS,
                "downsample": DOWNSAMPLE_KEYS, "meshes": MESHES_KEYS,
                "skeletons": SKELETONS_KEYS, "evaluate": EVALUATE_KEYS}
#: keys that are a command's on/off flags: true or false
FLAG_KEYS = ("amp", "float32", "fill_missing", "force", "sharded", "sparse")
QUEUE_KEYS = ("url", "min_memory", "max_memory")
SHIPPED_DIR = "pipelines"


@dataclass
class Queue:
    name: str
    url: str
    min_memory: int | None = None
    max_memory: int | None = None


@dataclass
class Pipeline:
    """A checked pipeline file. Paths are CloudVolume paths; relative ones are resolved
    against the directory the run starts in."""

    source: str
    output: str
    image: str
    products: tuple[str, ...]
    ground_truth: str | None = None
    map: str | None = None
    inference: dict = field(default_factory=dict)
    segmentation: dict = field(default_factory=dict)
    downsample: dict = field(default_factory=dict)
    meshes: dict = field(default_factory=dict)
    skeletons: dict = field(default_factory=dict)
    evaluate: dict = field(default_factory=dict)
    queues: dict[str, Queue] = field(default_factory=dict)

    def layer(self, name: str) -> str:
        """The path of a layer this run writes, under the output root."""
        return f"{self.output}/{name}"

    def routed(self, section: str) -> str:
        """The queue name a section's stages go to (before the memory rule)."""
        wanted = getattr(self, section).get("queue")
        if wanted:
            return wanted
        if section == "inference" and "inference" in self.queues:
            return "inference"
        return "default"

    def route(self, section: str, memory_bytes: int) -> Queue:
        """The queue of a stage: its section's queue; a stage bound for `default` goes
        instead to the queue with the largest `min_memory` that its largest task reaches (a
        section's own queue, such as inference's GPU queue, is kept)."""
        name = self.routed(section)
        larger = [q for q in self.queues.values()
                  if q.min_memory is not None and memory_bytes >= q.min_memory]
        if larger and name == "default":
            name = max(larger, key=lambda q: q.min_memory).name
        return self.queues[name]


def shipped_pipelines() -> list[str]:
    folder = resources.files("deepem3d") / SHIPPED_DIR
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def locate(name: str) -> tuple[str, str]:
    """(text, where it came from) of a pipeline file path or a shipped pipeline's name."""
    if os.path.isfile(name):
        try:
            return Path(name).read_text(), name
        except UnicodeDecodeError:
            raise InputError(f"{name}: not a text file (a pipeline file is YAML)") from None
    shipped = resources.files("deepem3d") / SHIPPED_DIR / f"{name}.yaml"
    if not name.endswith(".yaml") and shipped.is_file():
        return shipped.read_text(), f"{name} (shipped)"
    raise InputError(f"{name}: no such pipeline file (shipped pipelines: "
                     f"{', '.join(shipped_pipelines())})")


def _fail(source: str, key: str, message: str):
    raise InputError(f"{source}: {key}: {message}")


def _mapping(source: str, key: str, value, allowed: tuple[str, ...]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail(source, key, f"expected a mapping of {', '.join(allowed)}")
    unknown = sorted(set(value) - set(allowed), key=str)  # keys of any type: 1, ~
    if unknown:
        _fail(source, f"{key}.{unknown[0]}" if key else unknown[0],
              f"unknown key (allowed: {', '.join(allowed)})")
    return dict(value)


def _path(value: str, base: str | None = None) -> str:
    """A layer or queue path: URLs stay, local paths become absolute file:// paths."""
    if "://" in value:
        scheme, rest = value.split("://", 1)
        if scheme in ("file", "fq") and not rest.startswith("/"):
            return f"{scheme}://{os.path.abspath(rest)}"
        return value
    return f"file://{os.path.abspath(os.path.expanduser(value))}"


def _triple(source: str, key: str, value, kind=int, count: int = 3) -> list:
    if (not isinstance(value, list | tuple) or len(value) != count
            or not all(_finite(v) for v in value)):
        _fail(source, key, f"expected a list of {count} numbers, got {value!r}")
    if any(abs(v) > LARGEST_COORDINATE for v in value):
        _fail(source, key, f"{value!r}: coordinates are at most {LARGEST_COORDINATE:,}")
    if kind is int and any(v != int(v) for v in value):
        _fail(source, key, f"{value!r}: expected whole numbers of voxels")
    values = [kind(v) for v in value]
    if count == 3 and any(v <= 0 for v in values):
        _fail(source, key, f"{value!r} must be positive on every axis")
    if count == 6 and any(hi <= lo for lo, hi in zip(values[:3], values[3:])):
        _fail(source, key, f"{value!r}: each of x1, y1, z1 must exceed x0, y0, z0")
    return values


#: values a pipeline file may hold once its aliases are expanded (a real one holds hundreds)
MAX_NODES = 100_000


def _expanded_size(node, sizes: dict) -> int:
    """How many values `node` stands for with every alias expanded (an alias is the node it
    names, composed once: counted here without expanding it)."""
    if node is None or id(node) in sizes:
        return 0 if node is None else sizes[id(node)]
    sizes[id(node)] = 1  # a node that contains itself (a recursive alias) counts once
    children = node.value if isinstance(node.value, list) else []
    total = 1
    for child in children:
        for part in child if isinstance(child, tuple) else (child,):
            total += _expanded_size(part, sizes)
            if total > MAX_NODES:
                break
    sizes[id(node)] = total
    return total


def unique_keys_loader() -> type[yaml.SafeLoader]:
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the
    last silently: a second `inference:` would replace the first)."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
            if isinstance(node, yaml.MappingNode):
                seen = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys
                        continue  # are defaults the mapping's own may override
                    key = self.construct_object(key_node, deep=deep)
                    try:
                        duplicate = key in seen
                    except TypeError:  # a list or mapping as a key: the base class says so
                        break
                    if duplicate:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {key!r} given twice", key_node.start_mark)
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

        def construct_scalar(self, node: yaml.Node):
            value = super().construct_scalar(node)
            if isinstance(value, str) and "\0" in value:  # os calls: "embedded null byte"
                raise yaml.constructor.ConstructorError(
                    None, None, f"{value!r}: a NUL character in a value", node.start_mark)
            return value

    return UniqueKeys


def load_pipeline(name: str, *, output: str | None = None, queue: str | None = None) -> Pipeline:
    """Read and check a pipeline file (or a shipped pipeline's name). `output` and `queue`
    replace the file's output root and its `default` queue."""
    import yaml

    text, source = locate(name)
    try:
        node = yaml.compose(text, Loader=unique_keys_loader())
        if _expanded_size(node, {}) > MAX_NODES:  # aliases of aliases: a "billion laughs"
            raise InputError(f"{source}: its aliases expand to more than {MAX_NODES:,} values")
        data = yaml.load(text, Loader=unique_keys_loader())
    except yaml.YAMLError as err:
        raise InputError(f"{source}: not valid YAML ({str(err).splitlines()[0]})") from None
    except RecursionError:  # PyYAML composes and constructs recursively: [[[[...]]]]
        raise InputError(f"{source}: not valid YAML (nested too deeply)") from None
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a mapping of {', '.join(TOP_KEYS)}")
    _mapping(source, "", data, TOP_KEYS)
    version = data.get("version")
    if not (type(version) is int and version == VERSION):  # not true, not 1.0
        _fail(source, "version", f"{data.get('version')!r}: this deepem3d reads version "
              f"{VERSION} (write `version: {VERSION}`)")
    for key in ("output", "image"):
        value = data.get(key)
        if not (isinstance(value, str) and value.strip()) and not (key == "output"
                                                                   and output is not None):
            _fail(source, key, "missing: give a path" if value is None or value == "" else
                  f"{value!r} is not a path: give one (quote it if it reads as a number)")
    products = data.get("products", ["map", "segmentation"])
    if not isinstance(products, list) or not products:
        _fail(source, "products", f"expected a list of {', '.join(PRODUCTS)}")
    for i, product in enumerate(products):
        if not isinstance(product, str) or product not in PRODUCTS:
            _fail(source, "products", f"unknown product {product!r} (choose from "
                  f"{', '.join(PRODUCTS)})")
        if product in products[:i]:
            _fail(source, "products", f"{product} is listed twice")
    given = data["output"] if output is None else output  # --output '' is no folder either
    root = _path(given).rstrip("/") if given.strip() else ""
    if "://" not in root or not root.split("://", 1)[1]:  # `/`, `file:///`, `s3://`
        _fail(source, "output", f"{given!r} names no folder: give one")
    pipeline = Pipeline(
        source=source, output=root,
        image=data["image"] if data["image"] == SAMPLE else _path(data["image"]),
        products=tuple(products),
        inference=_mapping(source, "inference", data.get("inference"), INFERENCE_KEYS),
        segmentation=_mapping(source, "segmentation", data.get("segmentation"),
                              SEGMENTATION_KEYS),
        downsample=_mapping(source, "downsample", data.get("downsample"), DOWNSAMPLE_KEYS),
        meshes=_mapping(source, "meshes", data.get("meshes"), MESHES_KEYS),
        skeletons=_mapping(source, "skeletons", data.get("skeletons"), SKELETONS_KEYS),
        evaluate=_mapping(source, "evaluate", data.get("evaluate"), EVALUATE_KEYS),
    )
    for key in ("ground_truth", "map"):
        value = data.get(key)
        if value is not None and not (isinstance(value, str) and value.strip()):
            _fail(source, key, "expected a path")  # '' too: as `image: ''`, not dropped
        if value:
            setattr(pipeline, key, value if value == SAMPLE else _path(value))
    if pipeline.map == SAMPLE:
        _fail(source, "map", "the sample has no map: infer it (products: [map, ...])")
    _check_products(pipeline)
    _check_inputs_apart(pipeline)
    _check_sections(pipeline)
    _check_queues(pipeline, data.get("queues"), queue)
    return pipeline


def _check_inputs_apart(p: Pipeline) -> None:
    """No layer the run reads is, holds or lies in one it writes (a ground truth at
    OUTPUT/segmentation was found only after inference had run)."""
    from deepem3d.storage.layers import same_place

    written = _written_layers(p)
    mask = p.inference.get("mask")
    for key, path in (("image", p.image), ("ground_truth", p.ground_truth), ("map", p.map),
                      ("inference.mask", mask if isinstance(mask, str) and mask else None)):
        if not path or path == SAMPLE:
            continue
        for layer in written:
            if same_place(path, layer):
                _fail(p.source, key, f"{path} is, holds or lies in {layer}, which this run "
                      "writes: give the run another output")


def _number(value, kind=int | float) -> bool:
    """A number of `kind` that YAML's true and false (bool is an int) are not."""
    return isinstance(value, kind) and not isinstance(value, bool)


def _finite(value) -> bool:
    """A number that is a finite float: not inf, nan, or an int past a float's range (400
    digits, on which math.isfinite raises OverflowError)."""
    try:
        return _number(value) and math.isfinite(value)
    except OverflowError:
        return False


def _written_layers(p: Pipeline) -> list[str]:
    """The layers the run writes under its output root."""
    written = [p.layer(name) for name in ("map", "segmentation") if name in p.products]
    if SAMPLE in (p.image, p.ground_truth):  # the sample writes both of its layers
        written += [p.layer("image"), p.layer("ground_truth")]
    return written


def _check_products(p: Pipeline) -> None:
    if "segmentation" in p.products and "map" not in p.products and not p.map:
        _fail(p.source, "products", "segmentation needs a map: add the `map` product, or name "
              "an existing map layer with `map:`")
    if "map" in p.products and p.map:
        _fail(p.source, "map", "the file names a map layer and asks for the `map` product: "
              "keep one")
    for section, product in (("inference", "map"), ("segmentation", "segmentation")):
        if getattr(p, section) and product not in p.products:  # else silently not used
            _fail(p.source, section, f"given, but `{product}` is not among the products")
    layers = p.downsample.get("layers")
    if "downsample" in p.products:
        if layers is None:  # the layers under the output root: an input is named, not assumed
            layers = (["image"] if p.image == SAMPLE else []) + (
                ["segmentation"] if "segmentation" in p.products else [])
            if not layers:
                _fail(p.source, "downsample.layers", "name the layers to downsample (the "
                      "image lies outside the output root: `layers: [image]` adds its mip "
                      "levels in place)")
        if not isinstance(layers, list) or not layers:
            _fail(p.source, "downsample.layers", "expected a list of layer names")
        for i, name in enumerate(layers):
            made = {"image": True, "map": "map" in p.products,
                    "segmentation": "segmentation" in p.products}
            if not isinstance(name, str) or name not in made:
                _fail(p.source, "downsample.layers", f"unknown layer {name!r} (image, map, "
                      "segmentation)")
            if name in layers[:i]:
                _fail(p.source, "downsample.layers", f"{name} is listed twice")
            if not made[name]:
                _fail(p.source, "products", f"downsampling the {name} needs the {name} "
                      "product")
        p.downsample["layers"] = layers
    elif p.downsample:
        _fail(p.source, "downsample", "given, but `downsample` is not among the products")
    for product in OBJECT_PRODUCTS:
        _check_object_product(p, product)
    if p.evaluate and not p.ground_truth:
        _fail(p.source, "evaluate", "needs `ground_truth:`")
    if p.ground_truth and "segmentation" not in p.products:
        _fail(p.source, "ground_truth", "is scored against the segmentation: add the "
              "`segmentation` product")


def _check_object_product(p: Pipeline, product: str) -> None:
    from deepem3d.stages.objects import spatial_index_for

    options = getattr(p, product)
    if product in p.products and "segmentation" not in p.products:
        _fail(p.source, "products", f"{product} are made of the segmentation: add the "
              "`segmentation` product")
    if options and product not in p.products:
        _fail(p.source, product, f"given, but `{product}` is not among the products")
    mip = options.get("mip")
    if mip is not None and (not _number(mip, int) or mip < 0):
        _fail(p.source, f"{product}.mip", f"{mip!r} must be a mip level (0 or more)")
    if mip and "segmentation" not in (p.downsample.get("layers") or []):
        _fail(p.source, f"{product}.mip", f"mip {mip} of the segmentation needs the "
              "`downsample` product with the segmentation among its layers")
    for key in ("sharded", "spatial_index"):
        if key in options and not isinstance(options[key], bool):
            _fail(p.source, f"{product}.{key}", f"{options[key]!r}: write true or false")
    try:
        spatial_index_for(product, options.get("sharded", False), options.get("spatial_index"))
    except InputError as err:
        _fail(p.source, f"{product}.spatial_index", str(err))
    if "dust_threshold" in options and not (_number(options["dust_threshold"], int)
                                            and 0 <= options["dust_threshold"] <= INT64_MAX):
        _fail(p.source, f"{product}.dust_threshold", f"{options['dust_threshold']!r} must be "
              f"a number of voxels from 0 to {INT64_MAX}")
    for key in ("min_cable_nm", "tick_threshold"):
        value = options.get(key, 0)
        if not (_finite(value) and value >= 0):
            _fail(p.source, f"{product}.{key}", f"{value!r} must be a length in nm (0 or more)")


def _check_sections(p: Pipeline) -> None:
    from deepem3d.models.shipped import ENSEMBLES, PRETRAINED
    from deepem3d.models.sliding import TTA_CHOICES, WINDOWS

    inf, seg = p.inference, p.segmentation
    models = inf.get("model", [None])
    models = models if isinstance(models, list) else [models]
    if not models:
        _fail(p.source, "inference.model", "an empty list: name a model, or leave the key out "
              "for the default")
    for model in models:
        if model is None:
            continue
        if not isinstance(model, str):
            _fail(p.source, "inference.model", f"{model!r}: expected a name or a path")
        if model in PRETRAINED or model in ENSEMBLES or "://" in model:
            continue
        if not os.path.isfile(os.path.expanduser(model)):
            _fail(p.source, "inference.model", f"{model!r} is neither a shipped model "
                  f"({', '.join([*PRETRAINED, *ENSEMBLES])}) nor a checkpoint file")
    inf["model"] = models
    if "tta" in inf and (not _number(inf["tta"], int) or inf["tta"] not in TTA_CHOICES):
        _fail(p.source, "inference.tta", f"{inf['tta']!r}: choose one of "
              f"{', '.join(map(str, TTA_CHOICES))}")
    if "window" in inf and inf["window"] not in WINDOWS:
        _fail(p.source, "inference.window", f"{inf['window']!r}: choose one of "
              f"{', '.join(WINDOWS)}")
    if "device" in inf and inf["device"] not in ("auto", "cpu", "cuda"):
        _fail(p.source, "inference.device", f"{inf['device']!r}: choose auto, cpu or cuda")
    for key in ("patch_size", "patch_output", "batch_size", "threads"):
        if key in inf and (not _number(inf[key], int) or inf[key] < 1):
            _fail(p.source, f"inference.{key}", f"{inf[key]!r} must be a positive integer")
    for section, values, keys in (("inference", inf, ("overlap", "mip", "mask_mip")),
                                  ("downsample", p.downsample, ("num_mips",))):
        for key in keys:
            if key in values and values[key] is not None and (not _number(values[key], int)
                                                              or values[key] < 0):
                _fail(p.source, f"{section}.{key}",
                      f"{values[key]!r} must be an integer, 0 or more")
    for section, values in (("inference", inf), ("segmentation", seg),
                            ("downsample", p.downsample), ("meshes", p.meshes),
                            ("skeletons", p.skeletons)):
        if "queue" in values and not (isinstance(values["queue"], str)
                                      and values["queue"].strip()):
            _fail(p.source, f"{section}.queue", f"{values['queue']!r}: expected the name of "
                  "a queue that `queues:` defines")
    if "mask" in inf and not (isinstance(inf["mask"], str) and inf["mask"].strip()):
        _fail(p.source, "inference.mask", f"{inf['mask']!r}: expected a layer path")
    for section, values in (("inference", inf), ("segmentation", seg), ("meshes", p.meshes),
                            ("skeletons", p.skeletons)):
        for key in ("task_shape", "chunk_size"):
            if key in values:
                values[key] = _triple(p.source, f"{section}.{key}", values[key])
        if "bounds" in values:
            values["bounds"] = _triple(p.source, f"{section}.bounds", values["bounds"], count=6)
    if "bounds" in p.evaluate:
        p.evaluate["bounds"] = _triple(p.source, "evaluate.bounds", p.evaluate["bounds"],
                                       count=6)
    # a run that infers part of the image segments that part (and scores within it)
    if "map" in p.products and "bounds" in inf and "bounds" not in seg:
        seg["bounds"] = list(inf["bounds"])
    if "method" in seg and seg["method"] not in ("mean", "watershed"):
        _fail(p.source, "segmentation.method", f"{seg['method']!r}: choose mean or watershed")
    if "threshold" in seg:
        t = seg["threshold"]
        if not (_finite(t) and 0 <= t <= 1):
            _fail(p.source, "segmentation.threshold", f"{t!r} is outside [0, 1]" if _finite(t)
                  else f"{t!r} is not a number: give one in [0, 1], unquoted")
    if "sigma" in seg and not (_number(seg["sigma"]) and 0 <= seg["sigma"] <= 16):
        _fail(p.source, "segmentation.sigma", f"{seg['sigma']!r} must lie in [0, 16] voxels")
    if "dust_size" in seg and not (_number(seg["dust_size"], int)
                                   and 0 <= seg["dust_size"] <= INT64_MAX):
        _fail(p.source, "segmentation.dust_size", f"{seg['dust_size']!r} must be a whole "
              f"number from 0 to {INT64_MAX}")
    if "dust_mode" in seg and seg["dust_mode"] not in ("merge", "zero"):
        _fail(p.source, "segmentation.dust_mode", f"{seg['dust_mode']!r}: choose merge or zero")
    if "edges_per_voxel" in seg and not (_number(seg["edges_per_voxel"])
                                         and 0 < seg["edges_per_voxel"] <= 3):
        _fail(p.source, "segmentation.edges_per_voxel",
              f"{seg['edges_per_voxel']!r} must lie in (0, 3]")
    for section, values in (("inference", inf), ("segmentation", seg),
                            ("downsample", p.downsample)):
        for key in FLAG_KEYS:
            if key in values and not isinstance(values[key], bool):
                _fail(p.source, f"{section}.{key}", f"{values[key]!r}: write true or false")
    if "max_task_memory" in seg:
        try:
            seg["max_task_memory"] = parse_bytes(seg["max_task_memory"])
        except ValueError:
            _fail(p.source, "segmentation.max_task_memory",
                  f"{seg['max_task_memory']!r}: give bytes such as 24GiB")
        if seg["max_task_memory"] <= 0:
            _fail(p.source, "segmentation.max_task_memory", "must be positive")
    if "memory" in p.downsample:
        try:
            p.downsample["memory"] = parse_bytes(p.downsample["memory"])
        except ValueError:
            _fail(p.source, "downsample.memory", f"{p.downsample['memory']!r}: give bytes "
                  "such as 3.5GB")
    if "memory" in p.downsample and p.downsample["memory"] <= 0:
        _fail(p.source, "downsample.memory", f"{p.downsample['memory']!r} must be positive")
    if "factor" in p.downsample:
        p.downsample["factor"] = _triple(p.source, "downsample.factor", p.downsample["factor"])


def _check_queues(p: Pipeline, value, default: str | None) -> None:
    from deepem3d.run.queues import check_queue_url

    if value is not None and not isinstance(value, dict):
        _fail(p.source, "queues", "expected a mapping of queue names to fq:// or sqs:// URLs")
    for name, spec in (value or {}).items():
        if isinstance(spec, str):
            spec = {"url": spec}
        spec = _mapping(p.source, f"queues.{name}", spec, QUEUE_KEYS)
        if not isinstance(spec.get("url"), str):
            _fail(p.source, f"queues.{name}.url", "missing")
        try:
            url = check_queue_url(spec["url"])
        except InputError as err:
            _fail(p.source, f"queues.{name}", str(err))
        sizes = {}
        for key in ("min_memory", "max_memory"):
            if key in spec:
                try:
                    sizes[key] = parse_bytes(spec[key])
                except ValueError:
                    sizes[key] = -1
                if sizes[key] < 0:
                    _fail(p.source, f"queues.{name}.{key}", f"{spec[key]!r}: give bytes such "
                          "as 8GiB")
        if sizes.get("max_memory", math.inf) < sizes.get("min_memory", 0):
            _fail(p.source, f"queues.{name}.max_memory", "is below its min_memory")
        p.queues[name] = Queue(name, _path(url) if url.startswith("fq://") else url, **sizes)
    if default is not None:  # --queue '' is refused, as every command's --queue
        try:
            url = check_queue_url(default)
        except InputError as err:
            raise InputError(f"--queue: {err}") from None
        p.queues["default"] = Queue("default", _path(url) if url.startswith("fq://") else url)
    sections = [s for s, product in (("inference", "map"), ("segmentation", "segmentation"),
                                     ("downsample", "downsample"), ("meshes", "meshes"),
                                     ("skeletons", "skeletons"))
                if product in p.products]
    for section in sections:
        name = p.routed(section)
        if name not in p.queues and (name != "default" or getattr(p, section).get("queue")):
            _fail(p.source, f"{section}.queue", f"routes to queue {name!r}, which `queues:` "
                  "does not define")
    from deepem3d.storage.layers import same_place

    for name, queue in p.queues.items():  # found only once the layer exists, mid-run
        for layer in _written_layers(p) if queue.url.startswith("fq://") else []:
            if same_place("file://" + queue.url[len("fq://"):], layer):
                _fail(p.source, f"queues.{name}", f"{queue.url} lies in {layer}, which this "
                      "run writes: give the queue a folder of its own")
    used = {"default", *(p.routed(section) for section in sections)}
    for name, queue in p.queues.items():  # a typo (`inferance:`, `Default:`) sent nothing
        if name not in used and queue.min_memory is None:
            _fail(p.source, f"queues.{name}", "no stage goes to it: a section names it with "
                  "`queue:`, `inference` takes inference, `default` the rest, and one with "
                  "`min_memory` the larger tasks")


def add_local_queue(p: Pipeline) -> bool:
    """Give a file that names no default queue one on this machine; True when it did (nobody
    else would drain it: the run then needs local workers). Beside a local output root, so that
    an interrupted run resumes with what it had queued; elsewhere a folder of the temporary
    directory named after the output root, for the same reason. Nothing is created here."""
    if "default" in p.queues:
        return False
    if p.output.startswith("file://"):
        url = f"fq://{p.output[len('file://'):]}/queue"
    else:
        import tempfile

        from deepem3d.stages.frame import digest

        url = f"fq://{tempfile.gettempdir()}/deepem3d-queue-{digest(p.output)}"
    p.queues["default"] = Queue("default", url)
    return True

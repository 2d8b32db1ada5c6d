"""Optional peers of the speed benchmarks, the post's network in other frameworks: the post's own
graph in TensorFlow (tf.compat.v1: placeholders, a session, weights and biases ~ N(0, 1)), the
same network in Keras 3 and in PyTorch Lightning. None of them is a dependency of fmnist: a peer
imports its package only when chosen, and one whose package is missing is skipped with a note.

    pip install -r bench/requirements-peers.txt -c bench/constraints-peers.txt
    python bench/train_speed.py --peers tf,keras,lightning
    python bench/eval_speed.py --peers tf,keras

Every peer gets the same batches as the plain loop (128 images drawn with replacement from the
in-memory training set), on the CPU, with as many compute threads as torch has.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from plain import PlainNet
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from fmnist.data import IMAGE_SIZE, NUM_CLASSES, one_hot
from fmnist.inference.forward import predict_logits

KEEP_PROB = 0.75  # the post's dropout keep probability
LEARNING_RATE = 1e-3  # the post's Adam step size
EVAL_BATCH = 1000  # test images per forward pass when a peer's accuracy is measured (memory)
TF_GRAPH = "TF graph (the post, tf.compat.v1)"  # the row the "vs TF" ratios divide by
INSTALL = "pip install -r bench/requirements-peers.txt -c bench/constraints-peers.txt"

# A peer's name (the --peers value) -> the modules that provide it, the first importable one used.
PEERS = {
    "tf": ("tensorflow",),
    "keras": ("keras",),
    "lightning": ("lightning.pytorch", "pytorch_lightning"),
}


@dataclass(frozen=True)
class Outcome:
    seconds: float  # the training loop alone
    accuracy: float | None  # on the test set, after training; None when not measured


def peers_flag(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """Add --peers: a comma-separated subset of `names`, "all" (the default: those installed)
    or "none"."""

    def parse(text: str) -> list[str]:
        if text == "all":
            return list(names)
        chosen = [] if text == "none" else [n.strip() for n in text.split(",")]
        for name in chosen:
            if name not in names:
                raise argparse.ArgumentTypeError(
                    f"unknown peer {name!r}: choose from {', '.join(names)} (comma-separated), all or none")
        return chosen

    parser.add_argument("--peers", type=parse, default=list(names), metavar="LIST",
                        help=f"peers to run besides fmnist: {','.join(names)}, all (default: those "
                             f"installed) or none; their packages: {INSTALL}")


def load_peers(names: list[str]) -> tuple[dict[str, ModuleType], list[str]]:
    """The package of each named peer that can be imported, and a one-line note for each that
    cannot."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    loaded, notes = {}, []
    for name in names:
        errors = []
        for module in PEERS[name]:
            try:
                loaded[name] = importlib.import_module(module)
                break
            except ImportError as e:
                errors.append(str(e))
        else:
            notes.append(f"skipping {name}: {'; '.join(errors)} (to install the peers: {INSTALL})")
    if "tf" in loaded or ("keras" in loaded and loaded["keras"].backend.backend() == "tensorflow"):
        _match_torch_threads(importlib.import_module("tensorflow"))
    return loaded, notes


def versions(loaded: dict[str, ModuleType]) -> str:
    """The peers' package versions, for the table's heading."""
    return ", ".join(f"{m.__name__.split('.')[0]} {m.__version__}" for m in loaded.values())


def _match_torch_threads(tf) -> None:
    try:  # only possible before TensorFlow's runtime starts; then it is already set
        tf.config.threading.set_intra_op_parallelism_threads(torch.get_num_threads())
    except RuntimeError:
        pass


def _accuracy(predictions: np.ndarray, labels: torch.Tensor) -> float:
    return float((np.asarray(predictions) == labels.numpy()).mean())


# ----------------------------------------------------------------------------- TensorFlow graph


@dataclass(frozen=True)
class PostGraph:
    x: object  # placeholder (B, 784): pixels, flattened as the post fed them
    keep_prob: object  # placeholder (): the dropout keep probability
    logits: object  # (B, 10)


def post_graph(tf, weights: dict[str, np.ndarray] | None = None) -> PostGraph:
    """The post's network in the current tf.Graph: its weights and biases ~ N(0, 1), as its
    tf.random_normal drew them, or the given arrays (named as in the post)."""
    v1 = tf.compat.v1
    side = IMAGE_SIZE // 4  # two 2x2 poolings
    shapes = {"wc1": [5, 5, 1, 32], "wc2": [5, 5, 32, 64], "wf1": [side * side * 64, 1024],
              "out": [1024, NUM_CLASSES], "bc1": [32], "bc2": [64], "bf1": [1024], "bout": [NUM_CLASSES]}
    w = {k: tf.Variable(v1.random_normal(shape) if weights is None else weights[k]) for k, shape in shapes.items()}

    def conv_pool(h, kernel, bias):
        h = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(h, kernel, strides=1, padding="SAME"), bias))
        return tf.nn.max_pool2d(h, ksize=2, strides=2, padding="SAME")

    x = v1.placeholder(tf.float32, [None, IMAGE_SIZE * IMAGE_SIZE])
    keep_prob = v1.placeholder(tf.float32, [])
    h = tf.reshape(x, [-1, IMAGE_SIZE, IMAGE_SIZE, 1])
    h = conv_pool(h, w["wc1"], w["bc1"])  # (B, 14, 14, 32)
    h = conv_pool(h, w["wc2"], w["bc2"])  # (B, 7, 7, 64)
    h = tf.nn.relu(tf.matmul(tf.reshape(h, [-1, side * side * 64]), w["wf1"]) + w["bf1"])  # (B, 1024)
    h = tf.nn.dropout(h, rate=1.0 - keep_prob)
    return PostGraph(x, keep_prob, tf.matmul(h, w["out"]) + w["bout"])


def post_weights(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """fmnist's `post` weights named and laid out as the post's TensorFlow variables: kernels
    (kh, kw, in, out), dense (in, out). Its dense layer already reads (H, W, C) order."""
    numpy = {k: v.detach().cpu().numpy() for k, v in state.items()}
    return {"wc1": numpy["conv1.weight"].transpose(2, 3, 1, 0), "bc1": numpy["conv1.bias"],
            "wc2": numpy["conv2.weight"].transpose(2, 3, 1, 0), "bc2": numpy["conv2.bias"],
            "wf1": numpy["fc1.weight"].T, "bf1": numpy["fc1.bias"],
            "out": numpy["out.weight"].T, "bout": numpy["out.bias"]}


def _session(tf, graph):
    config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=torch.get_num_threads())
    return tf.compat.v1.Session(graph=graph, config=config)


def _graph_predictions(session, net: PostGraph, flat: np.ndarray, batch_size: int) -> np.ndarray:
    logits = [session.run(net.logits, {net.x: flat[i : i + batch_size], net.keep_prob: 1.0})
              for i in range(0, len(flat), batch_size)]
    return np.concatenate(logits).argmax(1)


def train_tf_graph(tf, train, test, steps: int, batch_size: int, seed: int) -> Outcome:
    """The post's training: softmax cross-entropy on one-hot labels, AdamOptimizer, dropout fed
    through a placeholder; the graph built and its variables initialised before the clock."""
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        v1.set_random_seed(seed)
        net = post_graph(tf)
        y = v1.placeholder(tf.float32, [None, NUM_CLASSES])
        loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels=y, logits=net.logits))
        step = v1.train.AdamOptimizer(LEARNING_RATE).minimize(loss)
        init = v1.global_variables_initializer()
    images, labels = train[0].reshape(len(train[0]), -1).numpy(), one_hot(train[1].numpy())
    rng = np.random.default_rng(seed)
    with _session(tf, graph) as session:
        session.run(init)
        start = time.perf_counter()
        for _ in range(steps):
            idx = rng.integers(len(images), size=batch_size)
            session.run([step, loss], {net.x: images[idx], y: labels[idx], net.keep_prob: KEEP_PROB})
        seconds = time.perf_counter() - start
        flat = test[0].reshape(len(test[0]), -1).numpy()
        return Outcome(seconds, _accuracy(_graph_predictions(session, net, flat, EVAL_BATCH), test[1]))


def tf_graph_predictor(tf, state: dict[str, torch.Tensor], batch_size: int) -> Callable[[torch.Tensor], np.ndarray]:
    """Predicted classes of images (N, 1, 28, 28) by the post's graph holding fmnist's `post`
    weights, fed flattened as the post fed them, `batch_size` images per session run."""
    graph = tf.Graph()
    with graph.as_default():
        net = post_graph(tf, post_weights(state))
        init = tf.compat.v1.global_variables_initializer()
    session = _session(tf, graph)
    session.run(init)
    return lambda images: _graph_predictions(session, net, images.reshape(len(images), -1).numpy(), batch_size)


# ----------------------------------------------------------------------------- Keras 3


def keras_post(keras, weights: dict[str, np.ndarray] | None = None):
    """The post's network as a Keras Sequential model on (B, 28, 28, 1) images: Keras' own
    initialisation, or the given arrays (named as in the post)."""
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((IMAGE_SIZE, IMAGE_SIZE, 1)),
        layers.Conv2D(32, 5, padding="same", activation="relu"),
        layers.MaxPooling2D(2),
        layers.Conv2D(64, 5, padding="same", activation="relu"),
        layers.MaxPooling2D(2),
        layers.Flatten(),  # (H, W, C) order, as the post's reshape
        layers.Dense(1024, activation="relu"),
        layers.Dropout(1.0 - KEEP_PROB),
        layers.Dense(NUM_CLASSES),
    ])
    if weights is not None:
        model.set_weights([weights[k] for k in ("wc1", "bc1", "wc2", "bc2", "wf1", "bf1", "out", "bout")])
    return model


def train_keras(keras, train, test, steps: int, batch_size: int, seed: int) -> Outcome:
    """`model.fit` of one epoch of `steps` batches, drawn before the clock so that the epoch is
    exactly the steps asked for; the time is that of fit alone."""
    keras.utils.set_random_seed(seed)
    model = keras_post(keras)
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    idx = np.random.default_rng(seed).integers(len(train[0]), size=steps * batch_size)
    images = train[0].reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 1).numpy()[idx]  # (steps * B, 28, 28, 1)
    labels = train[1].numpy()[idx]
    start = time.perf_counter()
    model.fit(images, labels, batch_size=batch_size, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)
    seconds = time.perf_counter() - start
    return Outcome(seconds, _accuracy(keras_predictor(model, EVAL_BATCH)(test[0]), test[1]))


def keras_predictor(model, batch_size: int) -> Callable[[torch.Tensor], np.ndarray]:
    """Predicted classes of images (N, 1, 28, 28) by `model.predict`."""
    return lambda images: model.predict(images.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 1).numpy(),
                                        batch_size=batch_size, verbose=0).argmax(1)


# ----------------------------------------------------------------------------- Lightning


def train_lightning(pl, train, test, steps: int, batch_size: int, seed: int) -> Outcome:
    """A LightningModule of the plain network, `Trainer.fit` for `steps` steps on the CPU without
    checkpoints, logger or progress bar; a DataLoader over the in-memory tensors that slices
    whole batches (no per-image collation, as the plain loop)."""

    class PostModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = PlainNet()

        def training_step(self, batch, batch_idx):
            images, labels = batch
            return F.cross_entropy(self.net(images), labels)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=LEARNING_RATE)

    for name in ("lightning.pytorch", "pytorch_lightning", "lightning.fabric", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)  # device and "max_steps reached" notes
    torch.manual_seed(seed)
    module = PostModule()
    dataset = TensorDataset(*train)
    draws = RandomSampler(dataset, replacement=True, num_samples=steps * batch_size,
                          generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(dataset, sampler=BatchSampler(draws, batch_size, drop_last=True), batch_size=None)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")  # Lightning on a newer torch
        start = time.perf_counter()
        trainer.fit(module, loader)
        seconds = time.perf_counter() - start
    predictions = predict_logits(module.net, test[0], EVAL_BATCH).argmax(1).numpy()
    return Outcome(seconds, _accuracy(predictions, test[1]))


def predictors(loaded: dict[str, ModuleType], state: dict[str, torch.Tensor],
               batch_size: int) -> dict[str, Callable[[torch.Tensor], np.ndarray]]:
    """The inference peers among `loaded` (the TF graph, Keras' `model.predict`) holding fmnist's
    `post` weights: table row -> predicted classes of images (N, 1, 28, 28)."""
    found = {}
    if "tf" in loaded:
        found[TF_GRAPH] = tf_graph_predictor(loaded["tf"], state, batch_size)
    if "keras" in loaded:
        found["Keras 3 model.predict"] = keras_predictor(keras_post(loaded["keras"], post_weights(state)), batch_size)
    return found


# A training peer's name -> its row in the table and the function that trains it.
TRAINERS = {"tf": (TF_GRAPH, train_tf_graph), "keras": ("Keras 3 model.fit", train_keras),
            "lightning": ("Lightning Trainer.fit", train_lightning)}

"""Gated PixelCNN over a grid of discrete codes: the VQ-VAE's learned prior (thesis 2.2.2, 2.5.1).

The prior factorises in raster order, p(c) = prod_i p(c_i | c_1, ..., c_{i-1}),
and one forward pass gives every conditional at once. Two stacks of
convolutions keep the order without a blind spot:

  vertical stack:   a (k//2 + 1, k) kernel over the rows up to the current one;
                    its features at row i depend only on rows < i.
  horizontal stack: a (1, k//2 + 1) kernel over the columns up to the current
                    one, plus a 1x1 link from the vertical stack; its features
                    at (i, j) depend on rows < i and on (i, < j).

Kernels are padded on the top / left only. The first layer (mask type A)
zeroes the taps on the current row (vertical) or column (horizontal), which
would see the position's own code; later layers (type B) keep them, since
their inputs already exclude it.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# stack -> (kernel shape, padding, axis of the taps at the current position) for k = 2 * half + 1.
STACKS = {
    'vertical': lambda half: ((half + 1, 2 * half + 1), ((half, 0), (half, half)), 0),
    'horizontal': lambda half: ((1, half + 1), ((0, 0), (half, 0)), 1),
}


def type_a_mask(kernel_shape, axis):
  """(kh, kw, in, out) ones with the last row (axis 0) or column (axis 1) zeroed."""
  mask = np.ones(kernel_shape, np.float32)
  index = [slice(None)] * len(kernel_shape)
  index[axis] = -1
  mask[tuple(index)] = 0.0
  return mask


class MaskedConv(nn.Module):
  """Causally padded convolution of one stack, of mask type 'A' or 'B'."""
  features: int
  kernel_size: int
  stack: str
  kind: str

  @nn.compact
  def __call__(self, x):
    shape, padding, axis = STACKS[self.stack](self.kernel_size // 2)
    mask = None
    if self.kind == 'A':
      mask = type_a_mask((*shape, x.shape[-1], self.features), axis)
    return nn.Conv(self.features, shape, padding=padding, mask=mask)(x)


def gate(x):
  """tanh(a) * sigmoid(b) for x = concat(a, b) on the channel axis."""
  a, b = jnp.split(x, 2, axis=-1)
  return jnp.tanh(a) * nn.sigmoid(b)


class GatedLayer(nn.Module):
  """One gated layer of both stacks: (v, h) -> (v', h'), each (B, h, w, features)."""
  features: int
  kernel_size: int
  kind: str

  @nn.compact
  def __call__(self, v, h):
    conv = lambda stack: MaskedConv(2 * self.features, self.kernel_size, stack, self.kind)
    v_pre = conv('vertical')(v)
    h_pre = conv('horizontal')(h) + nn.Dense(2 * self.features)(v_pre)
    h_out = nn.Dense(self.features)(gate(h_pre))
    if self.kind == 'B':  # type A's input holds the position's own code: no residual there
      h_out = h_out + h
    return gate(v_pre), h_out


class GatedPixelCNN(nn.Module):
  """Codes (B, h, w) int -> logits (B, h, w, K) of p(c_i | earlier codes)."""
  num_codes: int
  features: int
  num_layers: int
  kernel_size: int

  def __call__(self, codes):
    return self.logits(jax.nn.one_hot(codes, self.num_codes))

  @nn.compact
  def logits(self, inputs):
    """Real inputs (B, h, w, K), one-hot codes in use -> logits (B, h, w, K)."""
    v = h = inputs
    for index in range(self.num_layers):
      v, h = GatedLayer(self.features, self.kernel_size, 'A' if index == 0 else 'B')(v, h)
    h = nn.relu(nn.Dense(self.features)(nn.relu(h)))
    return nn.Dense(self.num_codes)(h)


def sample(model, params, key, shape, temperature=1.0):
  """Codes (B, h, w) drawn in raster order, each from softmax(logits / temperature).

  One forward pass per position inside a fori_loop; jit with `shape` static
  (the temperature may be traced, so it does not recompile).
  """
  _, height, width = shape

  def draw(index, codes):
    row, col = index // width, index % width
    logits = model.apply({'params': params}, codes)[:, row, col]
    new = jax.random.categorical(jax.random.fold_in(key, index), logits / temperature)
    return codes.at[:, row, col].set(new.astype(jnp.int32))

  return jax.lax.fori_loop(0, height * width, draw, jnp.zeros(shape, jnp.int32))

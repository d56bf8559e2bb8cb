"""keras-hub's own vision-backbone test harness, run on `VisionMoEBackbone`.

`keras_hub.src.tests.test_case.TestCase.run_vision_backbone_test` is what
keras-hub runs on its vision backbones: config and serialization round
trips, eager calls, `predict` on arrays and on a `tf.data` pipeline, the
class-name check, mixed precision (`mixed_float16`, `mixed_bfloat16`,
`bfloat16` given to the constructor: every sublayer's compute and variable
dtype, the output dtypes and `compute_output_spec`), quantization (int8 and
float8 through a `DTypePolicyMap` given to the constructor, config round
trip and weight transfer), and all of it again with
`data_format="channels_first"`.

The harness skips parts itself on some backends (CPU-only machines):
- torch: the mixed-precision check (keras-hub: "Torch lacks support" on
  CPU) and the quantization check (a keras-hub workaround for torch);
- TensorFlow: the channels_first pass (TensorFlow's CPU convolutions are
  channels-last only).
Our own tests cover those on every backend: test_dtype_policies.py,
test_quantization.py, tests/layers/test_experts_quantization.py and
test_shapes_and_data_format.py.
"""

import numpy as np
from keras_hub.src.tests import test_case

from keras_vmoe.models import VisionMoEBackbone


# Imported as a module: pytest would collect a `TestCase` name in this module.
class VisionMoEBackboneHarnessTest(test_case.TestCase):
    def setUp(self):
        # 8x8 images, 4x4 patches: 4 patches + the class token = 5 tokens;
        # block 1 is an MoE of 4 experts routing groups of 2 images.
        self.init_kwargs = {
            "image_shape": (8, 8, 3),
            "patch_size": 4,
            "num_layers": 2,
            "num_heads": 2,
            "hidden_dim": 8,
            "mlp_dim": 16,
            "moe_layers": [1],
            "router": "softmax_token_choice",
            "num_experts": 4,
            "group_size": 2,
            # The harness checks that the name is the class name in snake
            # case as Keras writes it ("vision_mo_e_backbone"); our default
            # name is "vision_moe_backbone".
            "name": "vision_mo_e_backbone",
        }
        self.input_data = np.random.RandomState(0).rand(2, 8, 8, 3).astype("float32")

    def test_vision_backbone_basics(self):
        self.run_vision_backbone_test(
            cls=VisionMoEBackbone,
            init_kwargs=self.init_kwargs,
            input_data=self.input_data,
            expected_output_shape={
                "sequence_output": (2, 5, 8),
                "pooled_output": (2, 8),
            },
            # With channels_first the harness transposes the outputs it is
            # told are spatial, all of them when the list is empty. Neither
            # is: naming only the 2-D pooled output (which it leaves as it
            # is) keeps the token sequence (B, T, d) as it is.
            spatial_output_keys=["pooled_output"],
        )

"""The start of every script run under Triton's CPU interpreter (TRITON_INTERPRET=1) by the kernel tests."""

import textwrap

PRELUDE = textwrap.dedent('''
    import json, sys
    import numpy as np
    import torch
    import triton.runtime.interpreter as interp

    try:
        int(np.array([1]))
    except TypeError:  # numpy >= 2.4 refuses int() of a 1-element array; the interpreter still does that
        _patch = interp._patch_lang_tensor

        def _patched(tensor, scope):
            _patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

        interp._patch_lang_tensor = _patched

''')

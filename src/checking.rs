//! Placeholder: the checking device is being written (see issue 2, item 5).

//! Tests for `data` (filled below).

//! Tests for `command`.

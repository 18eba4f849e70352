//! Hostile input: paths. (Tests follow.)

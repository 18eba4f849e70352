//! Hostile input: config. (Tests follow.)

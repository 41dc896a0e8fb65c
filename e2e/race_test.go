//go:build race

package e2e

// raceEnabled: the race detector's shadow memory grows RSS in proportion to
// everything that ever ran at once, so RSS bounds are looser under it.
const raceEnabled = true

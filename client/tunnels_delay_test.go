package client

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

func TestSameReplicaDelay(t *testing.T) {
	same := fmt.Errorf("second tunnel landed on r2: %w", errSameReplica)
	other := errors.New("dial tcp: connection refused")
	cases := []struct {
		name  string
		delay time.Duration
		err   error
		prior int // same-replica landings in a row before this one
		want  time.Duration
		after int
	}{
		{"a failure keeps the backoff", 8 * time.Second, other, 3, 8 * time.Second, 0},
		{"a landing caps a grown backoff", 16 * time.Second, same, 0, sameReplicaRetryMax, 1},
		{"a landing keeps a short backoff", 250 * time.Millisecond, same, 2, 250 * time.Millisecond, 3},
		{"the last quick try is still capped", 30 * time.Second, same, sameReplicaQuickTries - 1, sameReplicaRetryMax, sameReplicaQuickTries},
		{"past the quick tries the backoff grows (client affinity)", 30 * time.Second, same, sameReplicaQuickTries, 30 * time.Second, sameReplicaQuickTries + 1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			n := tc.prior
			assert.Equal(t, tc.want, sameReplicaDelay(tc.delay, tc.err, &n))
			assert.Equal(t, tc.after, n)
		})
	}
}

-- Platform upgrades of balancers: the build each balancer is told to run, as for servers.
ALTER TABLE balancers ADD COLUMN platform_target TEXT;
-- The generation that set it: a balancer retries a failed install at once for a new one.
ALTER TABLE balancers ADD COLUMN platform_target_generation BIGINT;

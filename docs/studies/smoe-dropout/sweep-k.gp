set terminal pngcairo size 900,560 font ',10' noenhanced
set output 'sweep-k.png'
set title 'cmoe study smoe-dropout, k, mean and 95 percent CI over seeds'
set xlabel 'router.k'
set ylabel 'test bpc'
set grid
set key outside right top
set offsets graph 0.05, graph 0.05, 0, 0
plot 'sweep-k.tsv' index 0 using 1:2:3 with yerrorlines lw 2 pt 7 lc rgb '#cc3311' title 'top2', \
     'sweep-k.tsv' index 1 using 1:2:3 with yerrorlines lw 2 pt 7 lc rgb '#228833' title 'smoe-dropout'
